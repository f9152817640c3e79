// Timeline probes of the sm90 MLA decode, compiled in only with TOKENSPEED_MLA_TRACE=1 at
// build time (-DTS_MLA_TRACE). Every 32nd CTA's producer thread (tid 0) and first consumer
// thread (tid 128) print `mla_trace <kernel> cta <i> tid <t> ev <e> ns <globaltimer>` at the
// events below; scripts/dev/mla_trace.py turns one call's lines into a table of phases.
// Without the define, TS_MLA_TRACE_EVENT compiles to nothing.
#pragma once

#include <cstdio>

namespace tokenspeed::mla_sm90::trace {

// Throughput probes of the fp8 variants' halves, compiled in only by scripts/dev/fp8_decode_probe.cu
// (-DTS_MLA_PROBE=n; results are garbage): 1 the producers alone (the consumers release each stage
// as soon as it is full), 2 the consumers alone (the producers arrive without loading), 3 (variant
// 2's widening producer) the producers load the codes but do not widen or store them.
#if !defined(TS_MLA_PROBE)
#define TS_MLA_PROBE 0
#endif
constexpr int kProbe = TS_MLA_PROBE;
constexpr int kProbeProducers = 1;
constexpr int kProbeConsumer = 2;
constexpr int kProbeLoadsOnly = 3;

#if defined(TS_MLA_TRACE)
struct PhaseClock {
  unsigned long long acc[8];
  unsigned long long t;
  int tiles;
};
#else
struct PhaseClock {};  // the non-trace build passes an empty one around
#endif

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
// Cycle accounting of the consumer loop (same build flag): TS_MLA_PHASE(k) adds the SM
// cycles since the previous mark to bucket k of the PhaseClock ph_ in scope (declared by
// TS_MLA_PHASE_DECL, passed by reference into helpers); TS_MLA_PHASE_PRINT prints one line
// per traced thread: `mla_phase cta <i> tid <t> tiles <n> <bucket cycles...>`.
#define TS_MLA_PHASE_DECL \
  ::tokenspeed::mla_sm90::trace::PhaseClock ph_ { {0, 0, 0, 0, 0, 0, 0, 0}, static_cast<unsigned long long>(clock64()), 0 }
#define TS_MLA_PHASE(k)                          \
  do {                                           \
    const unsigned long long ph_n_ = clock64();  \
    ph_.acc[k] += ph_n_ - ph_.t;                 \
    ph_.t = ph_n_;                               \
  } while (0)
#define TS_MLA_PHASE_TILE() (++ph_.tiles)
#define TS_MLA_PHASE_PRINT()                                                                          \
  do {                                                                                                \
    if (blockIdx.x % 32 == 0 && (threadIdx.x == 128 || threadIdx.x == 256 || threadIdx.x == 0)) {     \
      printf("mla_phase cta %d tid %d tiles %d c %llu %llu %llu %llu %llu %llu %llu %llu\n",          \
             static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x), ph_.tiles, ph_.acc[0],      \
             ph_.acc[1], ph_.acc[2], ph_.acc[3], ph_.acc[4], ph_.acc[5], ph_.acc[6], ph_.acc[7]);     \
    }                                                                                                 \
  } while (0)
#else
#define TS_MLA_TRACE_EVENT(kernel, ev) \
  do {                                 \
  } while (0)
#define TS_MLA_PHASE_DECL [[maybe_unused]] ::tokenspeed::mla_sm90::trace::PhaseClock ph_
#define TS_MLA_PHASE(k) \
  do {                  \
  } while (0)
#define TS_MLA_PHASE_TILE() \
  do {                      \
  } while (0)
#define TS_MLA_PHASE_PRINT() \
  do {                       \
  } while (0)
#endif

namespace tokenspeed::mla_sm90::trace {
// Buckets of TS_MLA_PHASE in the consumer (producer: 0 = waiting for an empty stage, 1 = the rest).
enum Phase : int {
  kPhAcquire = 0,  // waiting for a tile's TMA (full barrier), tail zeroing
  kPhWaitPv = 1,   // wgmma_wait<1>: PV(t-1) retiring
  kPhWaitQk = 2,   // wgmma_wait<0>: QK(t) retiring
  kPhSoftmax1 = 3, // scale, mask, row max
  kPhBarMax = 4,   // the row-max exchange barrier
  kPhSoftmax2 = 5, // exp2, sums, P stores, O rescale
  kPhBarP = 6,     // the P barrier
  kPhOther = 7,    // issuing wgmma, Q loads, epilogue
};
// The seesaw schedule's buckets (per tile pair; tiles counts pairs). WG0 (tid 128):
// 0 issue QK_a (waits for a to land), 1 wait S_a, 2 softmax_a, 3 rebase / tail / issue PV_aL,
// 4 wait PV_aL, 5 bar B (WG1's softmax_b), 6 issue PV_bL, 7 wait PV_bL and the rest.
// WG1 (tid 256): 0 issue QK_b (waits for b), 1 wait S_b, 2 scale / mask / max + bar A,
// 3 softmax_b, 4 rebase / tail / issue PV_aR, 5 wait PV_aR, 6 issue PV_bR, 7 wait PV_bR, rest.
}  // namespace tokenspeed::mla_sm90::trace
