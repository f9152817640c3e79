// Paged KV block pool and the move-only handles through which requests own pages.
//
// Every usable page (1 .. num_pages-1; page 0 is the null page) is in exactly one place:
//   free      - on the free stack, content meaningless;
//   used      - refcount > 0: held by one request (private) or, if cached, by any number;
//   cached    - in the prefix cache with refcount 0: kept for reuse, on the LRU list,
//               evicted (oldest first) when the free stack is empty.
// So used + free + cached == num_pages - 1 at all times.
//
// Only the pool mints PageHandle (private constructor, friend class BlockPool). A handle
// cannot be copied; destroying it drops one reference, and the last reference returns the
// page to the free stack (or, for a cached page, to the LRU tail). The pool must outlive
// every handle: the Scheduler declares the pool before anything that holds handles.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace tokenspeed::sched {

inline constexpr int32_t kNullPage = 0;

class BlockPool;

class PageHandle {
 public:
  PageHandle(PageHandle&& other) noexcept
      : pool_(std::exchange(other.pool_, nullptr)), page_(std::exchange(other.page_, kNullPage)) {}
  PageHandle& operator=(PageHandle&& other) noexcept {
    if (this != &other) {
      reset();
      pool_ = std::exchange(other.pool_, nullptr);
      page_ = std::exchange(other.page_, kNullPage);
    }
    return *this;
  }
  PageHandle(const PageHandle&) = delete;             // a page has one owner per reference
  PageHandle& operator=(const PageHandle&) = delete;
  ~PageHandle() { reset(); }

  int32_t page() const noexcept { return page_; }

 private:
  friend class BlockPool;
  PageHandle(BlockPool* pool, int32_t page) noexcept : pool_(pool), page_(page) {}
  void reset() noexcept;

  BlockPool* pool_ = nullptr;
  int32_t page_ = kNullPage;
};

// Told when the pool evicts a cached page, so the prefix cache can drop its entry.
class EvictionListener {
 public:
  virtual void on_evict(int32_t page) = 0;

 protected:
  ~EvictionListener() = default;
};

class BlockPool {
 public:
  explicit BlockPool(int32_t num_pages);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // A fresh private page: the top of the free stack, else the least recently used cached
  // page (evicted, listener told). nullopt when neither exists.
  std::optional<PageHandle> allocate();
  // One more reference to a cached page (a prefix-cache hit).
  PageHandle share(int32_t page);
  // Turns a held private page into a cached one (the prefix cache calls this on insert).
  void mark_cached(int32_t page);

  void set_eviction_listener(EvictionListener* listener) { listener_ = listener; }

  int32_t num_total() const { return num_pages_ - 1; }
  int32_t num_free() const { return static_cast<int32_t>(free_stack_.size()); }
  int32_t num_cached() const { return lru_size_; }  // cached and held by nobody
  int32_t num_used() const { return used_; }
  int32_t num_pages() const { return num_pages_; }
  int32_t refcount(int32_t page) const { return refcount_[page]; }
  bool is_cached(int32_t page) const { return cached_[page] != 0; }

  // Pages on the LRU list, least recently used first (for invariant checks and tests).
  std::vector<int32_t> lru_order() const;
  // Throws SchedulerError if the bookkeeping is inconsistent.
  void check_invariants() const;

 private:
  friend class PageHandle;
  void unref(int32_t page) noexcept;
  void lru_push_back(int32_t page) noexcept;
  void lru_remove(int32_t page) noexcept;

  int32_t num_pages_;
  std::vector<int32_t> refcount_;
  std::vector<uint8_t> cached_;
  std::vector<int32_t> free_stack_;  // back() is handed out next
  // Intrusive doubly-linked LRU list of cached pages with refcount 0 (-1 terminates).
  std::vector<int32_t> lru_prev_, lru_next_;
  int32_t lru_head_ = -1, lru_tail_ = -1, lru_size_ = 0;
  int32_t used_ = 0;
  EvictionListener* listener_ = nullptr;
};

inline void PageHandle::reset() noexcept {
  if (pool_ != nullptr) {
    pool_->unref(page_);
    pool_ = nullptr;
    page_ = kNullPage;
  }
}

}  // namespace tokenspeed::sched
