// Explicit instantiation of one grouped GEMM variant (Bf16LargeBf16, see grouped_gemm_sm90.cuh);
// one variant per file so they compile in parallel.
#include "moe/sm90/grouped_gemm_sm90.cuh"

namespace tokenspeed::moe_sm90 {

size_t workspace_bytes_bf16_large_bf16(int groups, int sm_count) { return Bf16LargeBf16::workspace_bytes(groups, sm_count); }

const char* run_bf16_large_bf16(const GroupedGemmParams& p, cudaStream_t stream) { return run_grouped<Bf16LargeBf16>(p, stream); }

}  // namespace tokenspeed::moe_sm90
