// Page-granular prefix cache over token ids.
//
// An entry is one full KV page, keyed by the chain hash of the token ids up to and
// including that page (TokenSeq::page_hashes). Each entry also records its parent page
// and its own token ids; a lookup is a hit only if the hash, the parent page and the
// tokens all match, so hits are exact (a hash collision only causes a miss).
//
// Reference counts live in the BlockPool: a request that hits an entry holds a
// PageHandle to that shared page. Entries held by nobody sit on the pool's LRU list and
// are evicted oldest first. Requests release pages last-page-first, so a parent is always
// behind its children on the LRU list and eviction only ever removes leaves: a cached
// page's parent is always cached (checked by check_invariants).
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "block_pool.h"
#include "token_seq.h"

namespace tokenspeed::sched {

class PrefixCache final : public EvictionListener {
 public:
  PrefixCache(BlockPool& pool, int32_t page_size, bool enabled);
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  bool enabled() const { return enabled_; }

  struct Match {
    std::vector<int32_t> pages;  // cached pages of the longest matching prefix, in order
    int32_t unheld = 0;          // how many of them nobody holds (sharing takes them off the LRU)
  };
  // Longest cached prefix of `seq`, at most max_pages pages. Takes no references.
  Match match(const TokenSeq& seq, int32_t max_pages) const;

  enum class Lookup { kAbsent, kFound, kConflict };
  struct Found {
    Lookup kind;
    int32_t page;
  };
  // Looks up one page of a chain. kConflict: the hash is taken by different content.
  Found find(uint64_t hash, int32_t parent_page, const int32_t* tokens) const;
  // Adds a held private page as the entry for `hash` (which must be absent).
  void insert(uint64_t hash, int32_t page, int32_t parent_page, const int32_t* tokens);

  void on_evict(int32_t page) override;

  int32_t num_entries() const { return static_cast<int32_t>(by_hash_.size()); }
  bool contains(int32_t page) const { return enabled_ && present_[page] != 0; }
  // The token ids stored for a cached page (page_size of them), or nullptr.
  const int32_t* page_tokens(int32_t page) const;
  int32_t parent_of(int32_t page) const { return parent_[page]; }

  void check_invariants() const;

 private:
  BlockPool& pool_;
  int32_t page_size_;
  bool enabled_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  // Per page id (sized only when enabled):
  std::vector<uint8_t> present_;
  std::vector<uint64_t> hash_of_;
  std::vector<int32_t> parent_;    // kNullPage for a first page
  std::vector<int32_t> children_;  // cached entries whose parent is this page
  std::vector<int32_t> tokens_;    // page_size token ids per page
};

}  // namespace tokenspeed::sched
