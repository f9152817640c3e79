// MUST NOT COMPILE: a page handle cannot be copied (two owners would free one page twice).
// EXPECT-ERROR: use of deleted function .*PageHandle\(const .*PageHandle&\)|call to deleted constructor of .*PageHandle
#include "block_pool.h"

using namespace tokenspeed::sched;

void misuse(BlockPool& pool) {
  PageHandle a = *pool.allocate();
  PageHandle b = a;
  (void)b;
}
