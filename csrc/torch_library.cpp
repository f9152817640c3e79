// The public op surface: every schema of the `tokenspeed` namespace lives here.
//
// Other engines (vLLM, SGLang) call these as torch.ops.tokenspeed.<op>; the
// schemas are the stable ABI. Implementations register per dispatch key in their
// family folder: the torch reference under CPU (csrc/<family>/*_cpu.cpp), kernels
// under CUDA (csrc/<family>/*_cuda.cpp). Fake (meta) implementations are
// registered from Python (tokenspeed_kernels/_fake.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#define TS_STRINGIFY_INNER(x) #x
#define TS_STRINGIFY(x) TS_STRINGIFY_INNER(x)

namespace {

// A JSON string describing what this binary was compiled with, so
// `python -m tokenspeed_kernels list` can say what the machine can run.
std::string build_info() {
  std::string info = "{\"cuda\": ";
#ifdef TOKENSPEED_WITH_CUDA
  info += std::string("true, \"cuda_archs\": \"") + TS_STRINGIFY(TOKENSPEED_CUDA_ARCHS_STR_RAW) + "\"";
#else
  info += "false, \"cuda_archs\": \"\"";
#endif
  info += "}";
  return info;
}

}  // namespace

TORCH_LIBRARY(tokenspeed, m) {
  m.def("build_info() -> str", &build_info);

  // Absorbed MLA decode over a paged latent cache; see tokenspeed_kernels/ops/mla.py.
  m.def(
      "mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, "
      "float softmax_scale, bool causal=True, int head_dim_v=512, Tensor? kv_scale=None) "
      "-> (Tensor out, Tensor lse)");

  // Non-absorbed ragged attention (prefill / chunked prefill over a cached prefix).
  m.def(
      "mla_prefill(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal=True) "
      "-> (Tensor out, Tensor lse)");

  // Merge two partial attention results over disjoint key sets by their LSE.
  m.def(
      "merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
      "-> (Tensor out, Tensor lse)");

  // Top-k expert selection (DeepSeek-V3 grouped sigmoid routing, or softmax top-k).
  m.def(
      "moe_route(Tensor router_logits, int top_k, str scoring_func=\"sigmoid\", "
      "Tensor? correction_bias=None, int n_group=1, int topk_group=1, "
      "bool renormalize=True, float routed_scaling_factor=1.0) "
      "-> (Tensor topk_weights, Tensor topk_ids)");

  // Experts applied to routed tokens and combined back in token order.
  m.def(
      "fused_moe(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, "
      "Tensor topk_ids, Tensor? w13_scale=None, Tensor? w2_scale=None, int expert_offset=0) "
      "-> Tensor");
}

// `import tokenspeed_kernels._C` needs a module init; the ops register as a side
// effect of loading the shared object.
static PyModuleDef tokenspeed_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&tokenspeed_c_module); }
