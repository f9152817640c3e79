// The wgmma shapes the Hopper MLA decode kernel issues: QK^T m64n32k16 (lockstep schedule) or
// m64n64k16 (seesaw), both operands in smem; PV m64n256k16 with V MN-major, P from smem (the
// transposed small-row consumers' register-A shapes are in mla_decode_sm90_fp8_regs.cuh). The
// generic wrappers are in common/sm90_ptx.cuh. Each shape takes its operand type as a template
// parameter (one asm body, TS_MLA_WGMMA_SS, for every shape and type).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tokenspeed::mla_sm90::dev {

// Operand element type: bf16 (bf16 cache) or f16 (fp8 cache: an e4m3 code converts to f16
// exactly in one instruction, mla_decode_sm90_fp8.cuh).
enum class MmaType { kBF16, kF16 };

// d (+)= A B with both descriptors in smem: desc + kOff (kOff = byte offset / 16), added inside
// the asm so the compiler cannot hoist the precomputed 64-bit descriptors into registers;
// scale_d = 0 overwrites the accumulator. With N accumulator registers the operands are %0 ..
// %N-1, then desc_a, desc_b, scale_d, kOffA, kOffB; ta / tb are 1 when A / B is MN-major
// ("transposed", 16-bit types only); OUTS lists the accumulator registers.
#define TS_MLA_WGMMA_SS(shape, type, regs, ta, tb, sc, da, oa, db, ob, OUTS)                              \
  asm volatile("{\n.reg .pred p;\n.reg .b64 da, db;\n"                                                    \
               "setp.ne.b32 p, " sc ", 0;\n"                                                              \
               "add.s64 da, " da ", " oa ";\n"                                                            \
               "add.s64 db, " db ", " ob ";\n"                                                            \
               "wgmma.mma_async.sync.aligned." shape ".f32." type "." type " " regs                       \
               ", da, db, p, 1, 1, " ta ", " tb ";\n}\n"                                                \
               : OUTS                                                                                     \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kOffA), "n"(kOffB))

// S[64 x 32] (+)= A[64 x 16] B[16 x 32]^T; A and B K-major in smem (the lockstep QK^T).
#define TS_MLA_ACC16 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define TS_MLA_REGS16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
template <MmaType kT, int kOffA, int kOffB>
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#define TS_MLA_WGMMA_16(TYPE) TS_MLA_WGMMA_SS("m64n32k16", TYPE, TS_MLA_REGS16, "0", "0", "%18", "%16", "%19", "%17", "%20", TS_MLA_ACC16)
  if constexpr (kT == MmaType::kF16) {
    TS_MLA_WGMMA_16("f16");
  } else {
    TS_MLA_WGMMA_16("bf16");
  }
#undef TS_MLA_WGMMA_16
}
#undef TS_MLA_ACC16
#undef TS_MLA_REGS16

// S[64 x 64] (+)= A[64 x 16] B[16 x 64]^T; A and B K-major in smem (the seesaw schedule's
// QK^T: one warpgroup, all 64 keys of a tile).
#define TS_MLA_ACC32 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define TS_MLA_REGS32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
template <MmaType kT, int kOffA, int kOffB>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#define TS_MLA_WGMMA_32(TYPE) TS_MLA_WGMMA_SS("m64n64k16", TYPE, TS_MLA_REGS32, "0", "0", "%34", "%32", "%35", "%33", "%36", TS_MLA_ACC32)
  if constexpr (kT == MmaType::kF16) {
    TS_MLA_WGMMA_32("f16");
  } else {
    TS_MLA_WGMMA_32("bf16");
  }
#undef TS_MLA_WGMMA_32
}
#undef TS_MLA_ACC32
#undef TS_MLA_REGS32

// O[64 x 256] (+)= A[64 x 16] B[16 x 256]; A K-major, B MN-major ("transposed") in smem.
#define TS_MLA_ACC128 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define TS_MLA_REGS128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                      \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                      \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                      \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                      \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                      \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "          \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
template <MmaType kT, int kOffA, int kOffB>
__device__ __forceinline__ void wgmma_m64n256k16_ss_tb(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#define TS_MLA_WGMMA_128(TYPE) TS_MLA_WGMMA_SS("m64n256k16", TYPE, TS_MLA_REGS128, "0", "1", "%130", "%128", "%131", "%129", "%132", TS_MLA_ACC128)
  if constexpr (kT == MmaType::kF16) {
    TS_MLA_WGMMA_128("f16");
  } else {
    TS_MLA_WGMMA_128("bf16");
  }
#undef TS_MLA_WGMMA_128
}
#undef TS_MLA_ACC128
#undef TS_MLA_REGS128

#undef TS_MLA_WGMMA_SS

}  // namespace tokenspeed::mla_sm90::dev
