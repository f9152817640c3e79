#include "prefix_cache.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "errors.h"

namespace tokenspeed::sched {

PrefixCache::PrefixCache(BlockPool& pool, int32_t page_size, bool enabled)
    : pool_(pool), page_size_(page_size), enabled_(enabled) {
  if (!enabled_) return;
  const size_t n = static_cast<size_t>(pool.num_pages());
  present_.assign(n, 0);
  hash_of_.assign(n, 0);
  parent_.assign(n, kNullPage);
  children_.assign(n, 0);
  tokens_.assign(n * static_cast<size_t>(page_size), 0);
  by_hash_.reserve(n);
  pool_.set_eviction_listener(this);
}

PrefixCache::Found PrefixCache::find(uint64_t hash, int32_t parent_page,
                                     const int32_t* tokens) const {
  const auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return {Lookup::kAbsent, kNullPage};
  const int32_t page = it->second;
  const bool same = parent_[page] == parent_page &&
                    std::memcmp(tokens_.data() + static_cast<size_t>(page) * page_size_, tokens,
                                sizeof(int32_t) * page_size_) == 0;
  return {same ? Lookup::kFound : Lookup::kConflict, page};
}

PrefixCache::Match PrefixCache::match(const TokenSeq& seq, int32_t max_pages) const {
  Match m;
  if (!enabled_) return m;
  const auto& hashes = seq.page_hashes();
  const int32_t limit = std::min<int32_t>(max_pages, static_cast<int32_t>(hashes.size()));
  int32_t prev = kNullPage;
  for (int32_t i = 0; i < limit; ++i) {
    const Found f = find(hashes[i], prev, seq.data() + static_cast<size_t>(i) * page_size_);
    if (f.kind != Lookup::kFound) break;
    m.pages.push_back(f.page);
    if (pool_.refcount(f.page) == 0) ++m.unheld;
    prev = f.page;
  }
  return m;
}

void PrefixCache::insert(uint64_t hash, int32_t page, int32_t parent_page, const int32_t* tokens) {
  if (!enabled_) throw SchedulerError("PrefixCache::insert: the prefix cache is disabled");
  if (!by_hash_.emplace(hash, page).second) {
    throw SchedulerError("PrefixCache::insert: hash of page " + std::to_string(page) +
                         " is already cached");
  }
  pool_.mark_cached(page);
  present_[page] = 1;
  hash_of_[page] = hash;
  parent_[page] = parent_page;
  children_[page] = 0;
  if (parent_page != kNullPage) ++children_[parent_page];
  std::memcpy(tokens_.data() + static_cast<size_t>(page) * page_size_, tokens,
              sizeof(int32_t) * page_size_);
}

void PrefixCache::on_evict(int32_t page) {
  if (!present_[page]) throw SchedulerError("PrefixCache: evicted page is not cached");
  if (children_[page] != 0) {
    // Would orphan cached children; the release order (children first) rules this out.
    throw SchedulerError("PrefixCache: evicting page " + std::to_string(page) +
                         " which still has cached children");
  }
  by_hash_.erase(hash_of_[page]);
  if (parent_[page] != kNullPage) --children_[parent_[page]];
  present_[page] = 0;
  parent_[page] = kNullPage;
}

const int32_t* PrefixCache::page_tokens(int32_t page) const {
  if (!contains(page)) return nullptr;
  return tokens_.data() + static_cast<size_t>(page) * page_size_;
}

void PrefixCache::check_invariants() const {
  if (!enabled_) return;
  auto fail = [](const std::string& what) { throw SchedulerError("PrefixCache invariant: " + what); };
  const int32_t n = pool_.num_pages();
  std::vector<int32_t> children(n, 0), lru_pos(n, -1);
  const auto lru = pool_.lru_order();
  for (size_t i = 0; i < lru.size(); ++i) lru_pos[lru[i]] = static_cast<int32_t>(i);
  int32_t count = 0;
  for (int32_t p = 1; p < n; ++p) {
    if (present_[p] != static_cast<uint8_t>(pool_.is_cached(p))) fail("pool and cache disagree on page " + std::to_string(p));
    if (!present_[p]) continue;
    ++count;
    const auto it = by_hash_.find(hash_of_[p]);
    if (it == by_hash_.end() || it->second != p) fail("hash map does not lead to page " + std::to_string(p));
    const int32_t parent = parent_[p];
    if (parent == kNullPage) continue;
    if (!present_[parent]) fail("page " + std::to_string(p) + " has an evicted parent (orphan)");
    ++children[parent];
    // Leaf-first eviction: an unheld parent's children are unheld and older on the LRU.
    if (pool_.refcount(parent) == 0 &&
        (pool_.refcount(p) != 0 || lru_pos[p] > lru_pos[parent])) {
      fail("page " + std::to_string(p) + " would outlive its parent " + std::to_string(parent) + " on the LRU");
    }
  }
  if (count != num_entries()) fail("entry count mismatch");
  for (int32_t p = 1; p < n; ++p) {
    if (present_[p] && children[p] != children_[p]) fail("child count of page " + std::to_string(p));
  }
}

}  // namespace tokenspeed::sched
