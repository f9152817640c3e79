// Timeline probes of the sm90 MLA decode, compiled in only with TOKENSPEED_MLA_TRACE=1 at
// build time (-DTS_MLA_TRACE). Every 32nd CTA's producer thread (tid 0) and first consumer
// thread (tid 128) print `mla_trace <kernel> cta <i> tid <t> ev <e> ns <globaltimer>` at the
// events below; scripts/dev/mla_trace.py turns one call's lines into a table of phases.
// Without the define, TS_MLA_TRACE_EVENT compiles to nothing.
#pragma once

#include <cstdio>

namespace tokenspeed::mla_sm90::trace {

enum Event : int {
  kEntry = 0,          // kernel entry
  kPlanDone = 1,       // plan computed, barriers initialised (after __syncthreads)
  kFirstTmaIssued = 2, // producer: the first tile's TMA boxes are issued
  kLastTmaIssued = 3,  // producer: the last tile's TMA boxes are issued
  kFirstTileFull = 4,  // consumer: the first tile has landed in smem
  kMainLoopDone = 5,   // consumer: the last PV of the last segment retired
  kEpilogueDone = 6,   // consumer: outputs stored
  kCombineWaited = 7,  // combine: griddepcontrol.wait returned
  kCombineDone = 8,    // combine: block finished
};

}  // namespace tokenspeed::mla_sm90::trace

#if defined(TS_MLA_TRACE)
#define TS_MLA_TRACE_EVENT(kernel, ev)                                                        \
  do {                                                                                        \
    if (blockIdx.x % 32 == 0 && blockIdx.y == 0 && (threadIdx.x == 0 || threadIdx.x == 128)) { \
      unsigned long long ns_;                                                                 \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns_));                                 \
      printf("mla_trace %s cta %d tid %d ev %d ns %llu\n", kernel, static_cast<int>(blockIdx.x), \
             static_cast<int>(threadIdx.x), static_cast<int>(ev), ns_);                      \
    }                                                                                         \
  } while (0)
#else
#define TS_MLA_TRACE_EVENT(kernel, ev) \
  do {                                 \
  } while (0)
#endif
