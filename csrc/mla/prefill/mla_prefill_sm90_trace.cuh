// Probe-only timeline of the sm90 MLA prefill kernel's steady state (off unless built with
// -DTS_PF_TRACE=1, as scripts/dev/prefill_probe.cu does): clock() at the 8 points PF_T(0..7)
// of each of the first 256 iterations of warp 0 of each consumer warpgroup of CTA 0. The
// points: 0 loop top, 1 after the K / V waits, 2 after the turn barrier, 3 after the issue,
// 4 after wait<1> (S ready), 5 after the row maxima, 6 after wait<0>, 7 after exp + pack.
#pragma once

#include <cstdint>

#ifndef TS_PF_TRACE
#define TS_PF_TRACE 0
#endif

#if TS_PF_TRACE
namespace tokenspeed::mla_prefill_sm90 {
__device__ uint32_t g_pf_trace[2 * 256 * 8];
}  // namespace tokenspeed::mla_prefill_sm90
// Uses the consumer's w (warpgroup), wtid (thread in it) and it_trace (iteration).
#define PF_T(ev)                                                      \
  if (blockIdx.x == 0 && wtid == 0 && it_trace < 256) {               \
    ::tokenspeed::mla_prefill_sm90::g_pf_trace[(w * 256 + it_trace) * 8 + (ev)] = clock(); \
  }
#else
#define PF_T(ev)
#endif
