// BlockPool, PageHandle, SlotPool, SlotHandle.
#include <type_traits>

#include "block_pool.h"
#include "errors.h"
#include "harness.h"
#include "slot_pool.h"

using namespace tokenspeed::sched;

// The handle contract, checked at compile time (the negative-compile tests check the
// same from the outside).
static_assert(!std::is_copy_constructible_v<PageHandle>);
static_assert(!std::is_copy_assignable_v<PageHandle>);
static_assert(std::is_nothrow_move_constructible_v<PageHandle>);
static_assert(std::is_nothrow_move_assignable_v<PageHandle>);
static_assert(!std::is_default_constructible_v<PageHandle>);
static_assert(!std::is_constructible_v<PageHandle, BlockPool*, int32_t>);  // only the pool mints
static_assert(!std::is_copy_constructible_v<SlotHandle>);
static_assert(!std::is_constructible_v<SlotHandle, SlotPool*, int32_t>);

namespace {
struct RecordingListener final : EvictionListener {
  std::vector<int32_t> evicted;
  void on_evict(int32_t page) override { evicted.push_back(page); }
};
}  // namespace

TEST_CASE(pool_hands_out_pages_in_order_and_never_the_null_page) {
  BlockPool pool(4);
  auto a = pool.allocate(), b = pool.allocate(), c = pool.allocate();
  CHECK(a && b && c);
  CHECK_EQ(a->page(), 1);
  CHECK_EQ(b->page(), 2);
  CHECK_EQ(c->page(), 3);
  CHECK(!pool.allocate().has_value());
  CHECK_EQ(pool.num_used(), 3);
  CHECK_EQ(pool.num_total(), 3);
  pool.check_invariants();
}

TEST_CASE(destroying_a_handle_frees_its_page) {
  BlockPool pool(3);
  {
    auto a = pool.allocate();
    CHECK_EQ(pool.num_free(), 1);
  }
  CHECK_EQ(pool.num_free(), 2);
  CHECK_EQ(pool.num_used(), 0);
  pool.check_invariants();
}

TEST_CASE(moving_a_handle_transfers_ownership_once) {
  BlockPool pool(3);
  PageHandle a = *pool.allocate();
  PageHandle b = std::move(a);
  CHECK_EQ(a.page(), kNullPage);
  CHECK_EQ(b.page(), 1);
  CHECK_EQ(pool.num_used(), 1);
  PageHandle c = *pool.allocate();
  c = std::move(b);  // c's old page (2) is freed, page 1 moves in
  CHECK_EQ(c.page(), 1);
  CHECK_EQ(pool.num_used(), 1);
  CHECK_EQ(pool.num_free(), 1);
  pool.check_invariants();
}

TEST_CASE(freed_pages_are_reused_last_in_first_out) {
  BlockPool pool(5);
  auto a = pool.allocate(), b = pool.allocate();
  b.reset();
  a.reset();
  CHECK_EQ(pool.allocate()->page(), 1);
}

TEST_CASE(cached_pages_go_to_the_lru_and_are_evicted_oldest_first) {
  BlockPool pool(4);
  RecordingListener listener;
  pool.set_eviction_listener(&listener);
  {
    PageHandle a = *pool.allocate(), b = *pool.allocate();
    pool.mark_cached(a.page());
    pool.mark_cached(b.page());
    PageHandle b2 = pool.share(b.page());
    CHECK_EQ(pool.refcount(b.page()), 2);
  }  // b2, b, a released: b reaches the LRU first
  CHECK_EQ(pool.num_cached(), 2);
  CHECK_EQ(pool.num_used(), 0);
  CHECK(pool.lru_order() == (std::vector<int32_t>{2, 1}));
  PageHandle shared = pool.share(1);  // a hit takes a page off the LRU
  CHECK_EQ(pool.num_cached(), 1);
  auto fresh = pool.allocate();  // page 3 is free
  CHECK_EQ(fresh->page(), 3);
  auto evicted = pool.allocate();  // nothing free: evict page 2
  CHECK_EQ(evicted->page(), 2);
  CHECK(listener.evicted == std::vector<int32_t>{2});
  CHECK(!pool.is_cached(2));
  CHECK(!pool.allocate().has_value());
  pool.check_invariants();
}

TEST_CASE(share_and_mark_cached_reject_misuse) {
  BlockPool pool(3);
  CHECK_THROWS(pool.share(1), SchedulerError, "not cached");
  CHECK_THROWS(pool.mark_cached(1), SchedulerError, "must be held");
  CHECK_THROWS(BlockPool(1), InvalidArgument, "null");
}

TEST_CASE(slot_handles_own_block_table_rows) {
  SlotPool slots(2, 3);
  {
    SlotHandle s0 = *slots.acquire();
    SlotHandle s1 = *slots.acquire();
    CHECK_EQ(s0.slot(), 0);
    CHECK_EQ(s1.slot(), 1);
    CHECK(!slots.acquire().has_value());
    s1.write_page(0, 7);
    s1.write_page(1, 9);
    CHECK_EQ(slots.table()[3], 7);
    CHECK_EQ(slots.table()[4], 9);
    CHECK_EQ(slots.row_len(1), 2);
    CHECK_THROWS(s1.write_page(3, 1), SchedulerError, "max_context_len");
  }
  for (int i = 0; i < 6; ++i) CHECK_EQ(slots.table()[i], 0);  // rows cleared on release
  CHECK_EQ(slots.num_free(), 2);
}
