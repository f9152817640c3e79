// MUST NOT COMPILE: a slot (block-table row) handle cannot be copied either.
// EXPECT-ERROR: use of deleted function .*SlotHandle\(const .*SlotHandle&\)|call to deleted constructor of .*SlotHandle
#include "slot_pool.h"

using namespace tokenspeed::sched;

void misuse(SlotPool& slots) {
  SlotHandle a = *slots.acquire();
  SlotHandle b = a;
  (void)b;
}
