// Request slots: one row each of the persistent block table [max_running_requests,
// max_pages_per_req] (int32 page ids, row-major) that Python reads as a numpy view.
//
// Like pages, slots are owned through move-only handles that only the SlotPool mints;
// destroying a SlotHandle zeroes the row (null page) and returns the slot.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace tokenspeed::sched {

class SlotPool;

class SlotHandle {
 public:
  SlotHandle(SlotHandle&& other) noexcept
      : pool_(std::exchange(other.pool_, nullptr)), slot_(std::exchange(other.slot_, -1)) {}
  SlotHandle& operator=(SlotHandle&& other) noexcept {
    if (this != &other) {
      reset();
      pool_ = std::exchange(other.pool_, nullptr);
      slot_ = std::exchange(other.slot_, -1);
    }
    return *this;
  }
  SlotHandle(const SlotHandle&) = delete;
  SlotHandle& operator=(const SlotHandle&) = delete;
  ~SlotHandle() { reset(); }

  int32_t slot() const noexcept { return slot_; }
  // Writes entry `index` of this slot's block-table row.
  inline void write_page(int32_t index, int32_t page) const;

 private:
  friend class SlotPool;
  SlotHandle(SlotPool* pool, int32_t slot) noexcept : pool_(pool), slot_(slot) {}
  inline void reset() noexcept;

  SlotPool* pool_ = nullptr;
  int32_t slot_ = -1;
};

class SlotPool {
 public:
  SlotPool(int32_t num_slots, int32_t max_pages_per_slot);
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;

  // Lowest-numbered free slot first on a fresh pool; nullopt when all are taken.
  std::optional<SlotHandle> acquire();

  int32_t num_slots() const { return num_slots_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t cols() const { return cols_; }
  const int32_t* table() const { return table_.data(); }
  int32_t* table() { return table_.data(); }
  int32_t row_len(int32_t slot) const { return row_len_[slot]; }
  bool is_free(int32_t slot) const;

 private:
  friend class SlotHandle;
  void write(int32_t slot, int32_t index, int32_t page);
  void release(int32_t slot) noexcept;

  int32_t num_slots_, cols_;
  std::vector<int32_t> table_;    // num_slots * cols
  std::vector<int32_t> row_len_;  // entries written per row (cleared on release)
  std::vector<int32_t> free_;     // back() is handed out next
};

inline void SlotHandle::write_page(int32_t index, int32_t page) const { pool_->write(slot_, index, page); }

inline void SlotHandle::reset() noexcept {
  if (pool_ != nullptr) {
    pool_->release(slot_);
    pool_ = nullptr;
    slot_ = -1;
  }
}

}  // namespace tokenspeed::sched
