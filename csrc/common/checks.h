// Input validation shared by every launcher (CPU and CUDA alike).
//
// Each check names the op and the argument so a caller from another engine sees
// what to fix ("mla_decode: block_table must be int32, got Long") instead of a
// crash inside a kernel. Order of checks in launchers: arch -> dtype -> device ->
// layout -> shapes, so the first message is the most fundamental problem.
#pragma once

#include <torch/types.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace tokenspeed {

inline std::string dtype_list(std::initializer_list<at::ScalarType> types) {
  std::ostringstream os;
  bool first = true;
  for (auto t : types) {
    os << (first ? "" : "/") << c10::toString(t);
    first = false;
  }
  return os.str();
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto a : allowed) {
    if (t.scalar_type() == a) return;
  }
  TORCH_CHECK(false, op, ": ", name, " must be ", dtype_list(allowed), ", got ",
              c10::toString(t.scalar_type()));
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have rank ", rank, " (", layout,
              "), got shape ", t.sizes());
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".shape[", dim, "] (", what,
              ") must be ", expected, ", got ", t.size(dim), " (shape ", t.sizes(), ")");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all inputs must be on one device");
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dimension, got strides ", t.strides());
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace tokenspeed
