// MUST COMPILE: the legal counterparts of every negative test, using the same headers,
// so the negative checks cannot pass because of a broken include or a typo.
#include <utility>

#include "block_pool.h"
#include "request_fsm.h"
#include "slot_pool.h"

using namespace tokenspeed::sched;

void legal(BlockPool& pool, SlotPool& slots, Decoding&& d) {
  PageHandle a = *pool.allocate();        // minted by the pool
  PageHandle b = std::move(a);            // moved, not copied
  SlotHandle s = *slots.acquire();
  SlotHandle t = std::move(s);
  (void)pages_of(d).size();               // a decoding request reaches its pages
  Finished f = on(std::move(d), EvFinish{FinishReason::kStop});
  (void)f.seq.size();                     // a finished request keeps only its tokens
  (void)b.page();
  (void)t.slot();
}
