#include "slot_pool.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace tokenspeed::sched {

SlotPool::SlotPool(int32_t num_slots, int32_t max_pages_per_slot)
    : num_slots_(num_slots),
      cols_(max_pages_per_slot),
      table_(static_cast<size_t>(num_slots) * static_cast<size_t>(max_pages_per_slot), 0),
      row_len_(num_slots, 0) {
  if (num_slots < 1 || max_pages_per_slot < 1) {
    throw InvalidArgument("SlotPool: need at least one slot and one page per slot");
  }
  free_.reserve(num_slots);
  for (int32_t s = num_slots - 1; s >= 0; --s) free_.push_back(s);
}

std::optional<SlotHandle> SlotPool::acquire() {
  if (free_.empty()) return std::nullopt;
  const int32_t slot = free_.back();
  free_.pop_back();
  return SlotHandle(this, slot);
}

bool SlotPool::is_free(int32_t slot) const {
  return std::find(free_.begin(), free_.end(), slot) != free_.end();
}

void SlotPool::write(int32_t slot, int32_t index, int32_t page) {
  if (index < 0 || index >= cols_) {
    throw SchedulerError("block table: page index " + std::to_string(index) +
                         " is outside a row of " + std::to_string(cols_) +
                         " pages (raise max_context_len)");
  }
  table_[static_cast<size_t>(slot) * cols_ + index] = page;
  row_len_[slot] = std::max(row_len_[slot], index + 1);
}

void SlotPool::release(int32_t slot) noexcept {
  // Clear the row so a stale page id can never be read through a reused slot.
  int32_t* row = table_.data() + static_cast<size_t>(slot) * cols_;
  std::fill(row, row + row_len_[slot], 0);
  row_len_[slot] = 0;
  free_.push_back(slot);
}

}  // namespace tokenspeed::sched
