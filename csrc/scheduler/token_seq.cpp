#include "token_seq.h"

#include <cstddef>
#include <utility>

#include "hash.h"

namespace tokenspeed::sched {

TokenSeq::TokenSeq(std::vector<int32_t> prompt, int32_t max_new_tokens, int32_t page_size,
                   bool hash_pages)
    : tokens_(std::move(prompt)),
      prompt_len_(static_cast<int32_t>(tokens_.size())),
      max_new_tokens_(max_new_tokens),
      page_size_(page_size),
      hash_pages_(hash_pages) {
  hash_full_pages();
}

void TokenSeq::append(const int32_t* tokens, int32_t n) {
  tokens_.insert(tokens_.end(), tokens, tokens + n);
  hash_full_pages();
}

void TokenSeq::hash_full_pages() {
  if (!hash_pages_) return;
  const size_t full = tokens_.size() / static_cast<size_t>(page_size_);
  while (hashes_.size() < full) {
    const size_t i = hashes_.size();
    const uint64_t parent = i == 0 ? kRootPageHash : hashes_[i - 1];
    hashes_.push_back(hash_page(parent, tokens_.data() + i * page_size_, page_size_));
  }
}

}  // namespace tokenspeed::sched
