// Argument checks of the ultraedit_fast ops shared by the CPU kernels
// (csrc/ultraedit_fast.cpp) and the CUDA kernels (csrc/cuda/ultraedit_fast_cuda.cu).
//
// Only what does not depend on the device lives here: ranks, shapes, dtypes,
// contiguity, aliasing.  Each kernel file checks afterwards that the tensors are
// on its device (and on one device).  The messages name the op (`op`) and are
// matched by tests/test_kernels.py::test_clear_errors, so keep their wording.
//
// Plain ATen (no CUDA headers): nvcc and the host compiler both include it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>

namespace ultraedit_fast {
namespace checks {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// ------------------------------------------------------------------ normalizer_update_
// The state (mean, acc, std: float32, contiguous, [D], distinct) and the list
// lengths; returns D = d_in + d_out.
inline int64_t check_normalizer_state(const at::Tensor& mean, const at::Tensor& acc,
                                      const at::Tensor& std_, at::TensorList ks,
                                      at::TensorList gs, int64_t n, const char* op) {
  TORCH_CHECK(ks.size() == gs.size(), op, ": ks and gs must have the same length, got ",
              ks.size(), " and ", gs.size());
  TORCH_CHECK(n >= 0, op, ": n (rows merged so far) must be >= 0, got ", n);
  TORCH_CHECK(mean.dim() == 1, op, ": mean must be 1-D, got shape ", mean.sizes());
  const int64_t D = mean.size(0);
  const char* names[] = {"mean", "acc", "std"};
  const at::Tensor* ts[] = {&mean, &acc, &std_};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *ts[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", names[i], " must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == D, op, ": ", names[i],
                " must have shape [d_in + d_out] = [", D, "], got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", names[i],
                " must be contiguous (it is updated in place)");
  }
  TORCH_CHECK(!mean.is_same(acc) && !mean.is_same(std_) && !acc.is_same(std_), op,
              ": mean, acc and std must be distinct tensors");
  return D;
}

// Block i of the lists: ks[i] (m x d_in) and gs[i] (m x d_out), floating.
inline void check_normalizer_block(const at::Tensor& k, const at::Tensor& g, size_t i,
                                   int64_t d_in, int64_t d_out, const char* op) {
  TORCH_CHECK(k.dim() == 2 && g.dim() == 2, op, ": ks[", i, "] and gs[", i,
              "] must be 2-D (rows x width), got shapes ", k.sizes(), " and ", g.sizes());
  TORCH_CHECK(k.size(0) == g.size(0), op, ": ks[", i, "] and gs[", i,
              "] must have the same number of rows, got ", k.size(0), " and ", g.size(0));
  TORCH_CHECK(k.size(1) == d_in && g.size(1) == d_out, op, ": block ", i, " has widths (",
              k.size(1), ", ", g.size(1), "), expected (d_in, d_out) = (", d_in, ", ", d_out,
              ") with d_in + d_out = mean.numel() = ", d_in + d_out);
  TORCH_CHECK(is_supported_float(k.scalar_type()) && is_supported_float(g.scalar_type()), op,
              ": ks[", i, "] and gs[", i, "] must be float32, bfloat16 or float16, got ",
              k.scalar_type(), " and ", g.scalar_type());
}

// ------------------------------------------------------------------ shift_values
struct ShiftSizes {
  int64_t N, d_in, d_out;
};

inline ShiftSizes check_shift_values_args(const at::Tensor& k, const at::Tensor& g,
                                          const at::Tensor& mean, const at::Tensor& std_,
                                          const char* op) {
  TORCH_CHECK(k.dim() == 2 && g.dim() == 2, op,
              ": k and g must be 2-D (N x d_in, N x d_out), got ", k.sizes(), " and ",
              g.sizes());
  const ShiftSizes s{k.size(0), k.size(1), g.size(1)};
  TORCH_CHECK(g.size(0) == s.N, op, ": k and g must have the same number of rows, got ", s.N,
              " and ", g.size(0));
  TORCH_CHECK(mean.dim() == 1 && std_.dim() == 1 && mean.size(0) == s.d_in + s.d_out &&
                  std_.size(0) == s.d_in + s.d_out,
              op, ": mean and std must have shape [d_in + d_out] = [", s.d_in + s.d_out,
              "], got ", mean.sizes(), " and ", std_.sizes());
  TORCH_CHECK(is_supported_float(k.scalar_type()) && is_supported_float(g.scalar_type()), op,
              ": k and g must be float32, bfloat16 or float16, got ", k.scalar_type(), " and ",
              g.scalar_type());
  TORCH_CHECK(mean.scalar_type() == at::kFloat && std_.scalar_type() == at::kFloat, op,
              ": mean and std must be float32, got ", mean.scalar_type(), " and ",
              std_.scalar_type());
  return s;
}

// ------------------------------------------------------------------ rank_update_
// w (R x C) += L^T Rm with L = a, Rm = k (nn.Linear, R = d_out, C = d_in) or,
// transposed, L = k, Rm = a (GPT-2 Conv1D, R = d_in, C = d_out).
struct RankSizes {
  int64_t N, d_out, d_in, R, C;
};

inline RankSizes check_rank_update_args(const at::Tensor& w, const at::Tensor& a,
                                        const at::Tensor& k, bool transposed, const char* op) {
  TORCH_CHECK(w.dim() == 2 && a.dim() == 2 && k.dim() == 2, op,
              ": w, a and k must be 2-D, got shapes ", w.sizes(), ", ", a.sizes(), " and ",
              k.sizes());
  RankSizes s{a.size(0), a.size(1), k.size(1), 0, 0};
  TORCH_CHECK(k.size(0) == s.N, op,
              ": a (N x d_out) and k (N x d_in) must have the same N, got ", a.sizes(), " and ",
              k.sizes());
  s.R = transposed ? s.d_in : s.d_out;
  s.C = transposed ? s.d_out : s.d_in;
  TORCH_CHECK(w.size(0) == s.R && w.size(1) == s.C, op, ": w must have shape ",
              transposed ? "(d_in, d_out) = (" : "(d_out, d_in) = (", s.R, ", ", s.C,
              ") for a ", a.sizes(), " and k ", k.sizes(),
              transposed ? " with transposed=True" : " with transposed=False", ", got ",
              w.sizes());
  TORCH_CHECK(is_supported_float(w.scalar_type()), op,
              ": w must be float32, bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK(is_supported_float(a.scalar_type()) && is_supported_float(k.scalar_type()), op,
              ": a and k must be floating (float32 expected), got ", a.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK(at::has_internal_overlap(w) != at::MemOverlap::Yes, op,
              ": w has overlapping memory (e.g. an expanded view); it cannot be updated in place");
  for (const at::Tensor* t : {&a, &k}) {
    const at::MemOverlapStatus o = at::get_overlap_status(w, *t);
    TORCH_CHECK(o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial, op,
                ": w shares memory with ", t == &a ? "a" : "k",
                "; the update would read what it writes");
  }
  return s;
}

}  // namespace checks
}  // namespace ultraedit_fast
