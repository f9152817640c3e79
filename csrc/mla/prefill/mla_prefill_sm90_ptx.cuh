// The two wgmma shapes the Hopper (sm_90a) MLA prefill kernel issues; the generic PTX
// wrappers (mbarriers, TMA, barriers, descriptors) are in common/sm90_ptx.cuh.
// Device code only; no torch headers.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/sm90_ptx.cuh"

namespace tokenspeed::mla_prefill_sm90::ptx {

using namespace ::tokenspeed::sm90;

#define TS_WGMMA_D64                                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                              \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                     \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                      \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define TS_WGMMA_D64_OPERANDS(d)                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),        \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),           \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),         \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),         \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),         \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),         \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),         \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),         \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// S[64 x 128] (+)= A[64 x 16] B[16 x 128]^T, A and B K-major in smem (QK^T). The
// descriptor offsets (16-byte units) are added inside the asm so the compiler cannot
// hoist one 64-bit descriptor per k-step into registers. kScaleD = 0 overwrites D.
template <int kOffA, int kOffB, int kScaleD>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "add.s64 da, %64, %67;\n"
      "add.s64 db, %65, %68;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " TS_WGMMA_D64
      ", da, db, p, 1, 1, 0, 0;\n}\n"
      : TS_WGMMA_D64_OPERANDS(d)
      : "l"(desc_a), "l"(desc_b), "r"(kScaleD), "n"(kOffA), "n"(kOffB));
}

// O[64 x 128] += P[64 x 16] V[16 x 128]: P from registers (the accumulator layout of S
// packed to bf16 pairs is exactly wgmma's A-register layout), V MN-major in smem.
template <int kOffB>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2,
                                                    uint32_t a3, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "add.s64 db, %68, %70;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " TS_WGMMA_D64
      ", {%64, %65, %66, %67}, db, p, 1, 1, 1;\n}\n"
      : TS_WGMMA_D64_OPERANDS(d)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1), "n"(kOffB));
}

#undef TS_WGMMA_D64
#undef TS_WGMMA_D64_OPERANDS

}  // namespace tokenspeed::mla_prefill_sm90::ptx
