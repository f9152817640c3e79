// MUST NOT COMPILE: only the BlockPool can mint a page handle.
// EXPECT-ERROR: PageHandle\(.*BlockPool\*, int32_t\).* is private within this context|calling a private constructor of class .*PageHandle
#include "block_pool.h"

using namespace tokenspeed::sched;

void misuse(BlockPool& pool) {
  PageHandle forged(&pool, 3);
  (void)forged;
}
