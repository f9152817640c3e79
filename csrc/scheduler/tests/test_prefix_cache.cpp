// PrefixCache: exact hits along a chain, conflicts, eviction bookkeeping.
#include "errors.h"
#include "harness.h"
#include "hash.h"
#include "prefix_cache.h"

using namespace tokenspeed::sched;

namespace {
constexpr int32_t kPage = 2;

// Caches the full pages of `seq` in fresh pages, as a finishing request would.
std::vector<PageHandle> cache_all(BlockPool& pool, PrefixCache& cache, const TokenSeq& seq) {
  std::vector<PageHandle> held;
  int32_t prev = kNullPage;
  for (size_t i = 0; i < seq.page_hashes().size(); ++i) {
    held.push_back(*pool.allocate());
    cache.insert(seq.page_hashes()[i], held.back().page(), prev, seq.data() + i * kPage);
    prev = held.back().page();
  }
  return held;
}
}  // namespace

TEST_CASE(token_seq_hashes_full_pages_incrementally) {
  TokenSeq seq({1, 2, 3}, 5, kPage, true);
  CHECK_EQ(seq.page_hashes().size(), 1u);
  const int32_t more[] = {4, 5};
  seq.append(more, 2);
  CHECK_EQ(seq.page_hashes().size(), 2u);
  const int32_t second[] = {3, 4};
  CHECK_EQ(seq.page_hashes()[1], hash_page(seq.page_hashes()[0], second, 2));
  CHECK_EQ(seq.generated(), 2);
  TokenSeq other({9, 9, 3, 4}, 1, kPage, true);  // same second page, different parent
  CHECK(other.page_hashes()[1] != seq.page_hashes()[1]);
  CHECK(TokenSeq({1, 2}, 1, kPage, false).page_hashes().empty());
}

TEST_CASE(match_follows_the_chain_and_stops_at_the_first_miss) {
  BlockPool pool(16);
  PrefixCache cache(pool, kPage, true);
  TokenSeq a({1, 2, 3, 4, 5, 6, 7}, 1, kPage, true);
  auto held = cache_all(pool, cache, a);
  CHECK_EQ(cache.num_entries(), 3);
  TokenSeq b({1, 2, 3, 4, 9, 9, 7}, 1, kPage, true);
  auto m = cache.match(b, 3);
  CHECK_EQ(m.pages.size(), 2u);
  CHECK_EQ(m.pages[0], held[0].page());
  CHECK_EQ(m.unheld, 0);  // still held by `held`
  CHECK_EQ(cache.match(a, 2).pages.size(), 2u);  // the limit is respected
  while (!held.empty()) held.pop_back();  // last page first, like a Resident
  CHECK_EQ(pool.num_cached(), 3);
  CHECK_EQ(cache.match(a, 3).unheld, 3);
  cache.check_invariants();
  pool.check_invariants();
}

TEST_CASE(a_hash_hit_with_other_tokens_is_a_conflict_not_a_hit) {
  BlockPool pool(8);
  PrefixCache cache(pool, kPage, true);
  PageHandle p = *pool.allocate();
  const int32_t t1[] = {1, 2}, t2[] = {1, 3};
  cache.insert(42, p.page(), kNullPage, t1);
  CHECK(cache.find(42, kNullPage, t1).kind == PrefixCache::Lookup::kFound);
  CHECK(cache.find(42, kNullPage, t2).kind == PrefixCache::Lookup::kConflict);  // forced collision
  CHECK(cache.find(42, 5, t1).kind == PrefixCache::Lookup::kConflict);          // other parent
  CHECK(cache.find(43, kNullPage, t1).kind == PrefixCache::Lookup::kAbsent);
  CHECK_THROWS(cache.insert(42, p.page(), kNullPage, t1), SchedulerError, "already cached");
}

TEST_CASE(eviction_removes_entries_leaf_first) {
  BlockPool pool(3);  // two usable pages
  PrefixCache cache(pool, kPage, true);
  TokenSeq a({1, 2, 3, 4, 5}, 1, kPage, true);
  {
    auto held = cache_all(pool, cache, a);
    held.pop_back();  // child first, like a Resident
  }
  CHECK(pool.lru_order() == (std::vector<int32_t>{2, 1}));
  auto page = pool.allocate();  // evicts the leaf (page 2)
  CHECK_EQ(page->page(), 2);
  CHECK_EQ(cache.num_entries(), 1);
  CHECK_EQ(cache.match(a, 2).pages.size(), 1u);
  cache.check_invariants();
  auto last = pool.allocate();
  CHECK_EQ(cache.num_entries(), 0);
}

TEST_CASE(evicting_a_parent_before_its_child_is_refused) {
  BlockPool pool(3);
  PrefixCache cache(pool, kPage, true);
  TokenSeq a({1, 2, 3, 4, 5}, 1, kPage, true);
  {
    auto held = cache_all(pool, cache, a);
    // Wrong order on purpose: the parent reaches the LRU first.
    PageHandle parent = std::move(held[0]);
  }
  CHECK_THROWS(pool.allocate(), SchedulerError, "still has cached children");
}

TEST_CASE(a_disabled_cache_matches_nothing) {
  BlockPool pool(4);
  PrefixCache cache(pool, kPage, false);
  TokenSeq a({1, 2, 3}, 1, kPage, false);
  CHECK(cache.match(a, 1).pages.empty());
  CHECK_THROWS(cache.insert(1, 1, kNullPage, a.data()), SchedulerError, "disabled");
}
