#include "block_pool.h"

#include <string>

#include "errors.h"

namespace tokenspeed::sched {

BlockPool::BlockPool(int32_t num_pages)
    : num_pages_(num_pages),
      refcount_(num_pages, 0),
      cached_(num_pages, 0),
      lru_prev_(num_pages, -1),
      lru_next_(num_pages, -1) {
  if (num_pages < 2) throw InvalidArgument("BlockPool: num_pages must be >= 2 (page 0 is null)");
  // Stack in descending order so pages are handed out 1, 2, 3, ... on a fresh pool.
  free_stack_.reserve(num_pages - 1);
  for (int32_t p = num_pages - 1; p >= 1; --p) free_stack_.push_back(p);
}

std::optional<PageHandle> BlockPool::allocate() {
  int32_t page;
  if (!free_stack_.empty()) {
    page = free_stack_.back();
    free_stack_.pop_back();
  } else if (lru_head_ != -1) {
    page = lru_head_;
    lru_remove(page);
    cached_[page] = 0;
    if (listener_ != nullptr) listener_->on_evict(page);
  } else {
    return std::nullopt;
  }
  refcount_[page] = 1;
  ++used_;
  return PageHandle(this, page);
}

PageHandle BlockPool::share(int32_t page) {
  if (page <= kNullPage || page >= num_pages_ || !cached_[page]) {
    throw SchedulerError("BlockPool::share: page " + std::to_string(page) + " is not cached");
  }
  if (refcount_[page] == 0) {
    lru_remove(page);
    ++used_;
  }
  ++refcount_[page];
  return PageHandle(this, page);
}

void BlockPool::mark_cached(int32_t page) {
  if (page <= kNullPage || page >= num_pages_ || refcount_[page] == 0 || cached_[page]) {
    throw SchedulerError("BlockPool::mark_cached: page " + std::to_string(page) +
                         " must be held and not yet cached");
  }
  cached_[page] = 1;
}

void BlockPool::unref(int32_t page) noexcept {
  if (--refcount_[page] > 0) return;
  --used_;
  if (cached_[page]) {
    lru_push_back(page);
  } else {
    free_stack_.push_back(page);
  }
}

void BlockPool::lru_push_back(int32_t page) noexcept {
  lru_prev_[page] = lru_tail_;
  lru_next_[page] = -1;
  if (lru_tail_ != -1) {
    lru_next_[lru_tail_] = page;
  } else {
    lru_head_ = page;
  }
  lru_tail_ = page;
  ++lru_size_;
}

void BlockPool::lru_remove(int32_t page) noexcept {
  const int32_t prev = lru_prev_[page], next = lru_next_[page];
  if (prev != -1) {
    lru_next_[prev] = next;
  } else {
    lru_head_ = next;
  }
  if (next != -1) {
    lru_prev_[next] = prev;
  } else {
    lru_tail_ = prev;
  }
  lru_prev_[page] = lru_next_[page] = -1;
  --lru_size_;
}

std::vector<int32_t> BlockPool::lru_order() const {
  std::vector<int32_t> out;
  out.reserve(lru_size_);
  for (int32_t p = lru_head_; p != -1; p = lru_next_[p]) out.push_back(p);
  return out;
}

void BlockPool::check_invariants() const {
  auto fail = [](const std::string& what) { throw SchedulerError("BlockPool invariant: " + what); };
  // 0 = unseen, 1 = free, 2 = cached-unheld, 3 = used
  std::vector<uint8_t> where(num_pages_, 0);
  for (int32_t p : free_stack_) {
    if (p <= kNullPage || p >= num_pages_) fail("free stack holds page " + std::to_string(p));
    if (where[p] != 0) fail("page " + std::to_string(p) + " is on the free stack twice");
    if (refcount_[p] != 0 || cached_[p]) fail("free page " + std::to_string(p) + " is held or cached");
    where[p] = 1;
  }
  int32_t n_lru = 0;
  for (int32_t p : lru_order()) {
    if (where[p] != 0) fail("page " + std::to_string(p) + " is both free and on the LRU list");
    if (refcount_[p] != 0 || !cached_[p]) fail("LRU page " + std::to_string(p) + " is held or uncached");
    where[p] = 2;
    ++n_lru;
  }
  if (n_lru != lru_size_) fail("LRU size mismatch");
  int32_t n_used = 0;
  for (int32_t p = 1; p < num_pages_; ++p) {
    if (refcount_[p] < 0) fail("negative refcount on page " + std::to_string(p));
    if (refcount_[p] > 0) {
      ++n_used;
      if (where[p] != 0) fail("held page " + std::to_string(p) + " is also free or on the LRU");
      where[p] = 3;
    }
    if (where[p] == 0) fail("page " + std::to_string(p) + " is lost (not free, cached or used)");
  }
  if (refcount_[kNullPage] != 0 || cached_[kNullPage]) fail("the null page was handed out");
  if (n_used != used_) fail("used counter mismatch");
  if (num_used() + num_free() + num_cached() != num_total()) fail("used + free + cached != total");
}

}  // namespace tokenspeed::sched
