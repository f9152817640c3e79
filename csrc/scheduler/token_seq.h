// The token ids of one request (prompt, then generated tokens) plus the chain hash of every
// full page of them, kept up to date as tokens are appended, so prefix-cache lookups and
// inserts never rehash a 50K-token context.
#pragma once

#include <cstdint>
#include <vector>

namespace tokenspeed::sched {

class TokenSeq {
 public:
  // hash_pages=false (prefix cache off) skips the hashing entirely.
  TokenSeq(std::vector<int32_t> prompt, int32_t max_new_tokens, int32_t page_size,
           bool hash_pages);

  void append(const int32_t* tokens, int32_t n);

  int32_t size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t prompt_len() const { return prompt_len_; }
  int32_t max_new_tokens() const { return max_new_tokens_; }
  int32_t generated() const { return size() - prompt_len_; }
  int32_t operator[](int32_t i) const { return tokens_[i]; }
  const int32_t* data() const { return tokens_.data(); }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  // page_hashes()[i] = hash of page i chained on page i-1; one per full page.
  const std::vector<uint64_t>& page_hashes() const { return hashes_; }

 private:
  void hash_full_pages();

  std::vector<int32_t> tokens_;
  std::vector<uint64_t> hashes_;
  int32_t prompt_len_;
  int32_t max_new_tokens_;
  int32_t page_size_;
  bool hash_pages_;
};

}  // namespace tokenspeed::sched
