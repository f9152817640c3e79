// MUST NOT COMPILE: a Finished request has no field that could hold pages.
// EXPECT-ERROR: Finished' has no member named 'res'|no member named 'res' in .*Finished
#include "request_fsm.h"

using namespace tokenspeed::sched;

void misuse(Decoding&& d) {
  Finished f = on(std::move(d), EvFinish{FinishReason::kStop});
  (void)f.res.pages();
}
