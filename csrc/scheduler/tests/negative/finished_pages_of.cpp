// MUST NOT COMPILE: pages_of() exists only for the states that hold pages.
// EXPECT-ERROR: no matching function for call to 'pages_of
#include "request_fsm.h"

using namespace tokenspeed::sched;

void misuse(const Finished& f) { (void)pages_of(f); }
