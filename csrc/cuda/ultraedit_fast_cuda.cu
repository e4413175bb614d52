// CUDA kernels of the ultraedit_fast ops (schemas: ultraedit_fast/kernels/ops.py).
//
// Only TORCH_LIBRARY_IMPL(ultraedit_fast, CUDA, ...) here: the schemas are
// defined in Python before ultraedit_fast._C is imported.
//
// Precision: every kernel accumulates in float32 (the normaliser's state update
// in float64) and uses correctly rounded division/sqrt (__fdiv_rn,
// __fsqrt_rn) so the result does not depend on --use_fast_math.
//
// Precision policy of rank_update_ (w += a^T k), by w's dtype:
//   float32 w          exact path: float32 products and sums (SIMT FMA, no
//                      tensor cores), as torch's float32 addmm_ without TF32.
//   bfloat16/float16 w tensor cores on sm_80+: a and k rounded to TF32 (10
//                      mantissa bits, to nearest), float32 accumulation, one
//                      rounding into w in the in-place epilogue.  The update's
//                      error is < 2^-10 * sum_i |a_i k_i| (+ float32
//                      accumulation), below half a bf16 ulp of the update; w's
//                      final rounding differs from the exactly rounded result
//                      by at most one ulp wherever that bound is below half an
//                      ulp of w (no cancellation), and for a small fraction of
//                      elements (see rank_update_tc_kernel).  Pre-sm_80: the
//                      exact SIMT path.
//
// Headers: only c10/cuda (stream, guard) and the CUDA runtime, not
// ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER headers the
// kernels do not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace ultraedit_fast {
namespace {

constexpr float kEps = 1.1920928955078125e-07f;  // float32 machine epsilon

template <typename T>
__device__ __forceinline__ float ld_f(const T* p) {
  return static_cast<float>(*p);  // c10::BFloat16 / c10::Half: exact widening
}

#define UEF_CUDA_DISPATCH(TYPE, NAME, ...)                                              \
  [&] {                                                                                 \
    switch (TYPE) {                                                                     \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                 \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }      \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }              \
      default:                                                                          \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE,                          \
                    " (expected float32, bfloat16 or float16)");                        \
    }                                                                                   \
  }()

void check_cuda_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                            const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name,
              " must be on the same CUDA device as the others (", ref.device(), "), got ",
              t.device());
}

// The device checks of an op (the rest is checks.h's): `ref` is a CUDA tensor
// and every other input is on its device.
void check_cuda_inputs(const char* op, const at::Tensor& ref, const char* ref_name,
                       std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  TORCH_CHECK(ref.is_cuda(), op, ": ", ref_name, " must be a CUDA tensor for the CUDA kernel");
  for (const auto& t : others) check_cuda_same_device(*t.first, ref, op, t.second);
}

// ================================================================== normalizer_update_
// One launch merges up to kMaxBlocks row blocks, in order.  Grid: one CTA per
// kCols columns (of k, or of g: two launches, so each has one dtype).  Each CTA
// reduces its columns over the rows of a block with kRowLanes row lanes
// (shifted sums, shift = the block's first row, so no cancellation when
// |mean| >> std), combines the lanes in shared memory, and one thread per
// column applies the state update in float64, carrying mean/acc in registers
// from block to block.  Only the final state is written.
constexpr int kMaxBlocks = 64;
constexpr int kCols = 32;
constexpr int kRowLanes = 8;

struct NormBlocks {
  const void* ptr[kMaxBlocks];  // block b: rows[b] x width, rows contiguous
  int64_t rows[kMaxBlocks];
  int nblocks;
};

template <typename T>
__global__ void __launch_bounds__(kCols * kRowLanes)
    normalizer_kernel(const NormBlocks blocks, int64_t width, int64_t n0, float* __restrict__ mean,
                      float* __restrict__ acc, float* __restrict__ stdv) {
  __shared__ double sh1[kRowLanes][kCols];
  __shared__ double sh2[kRowLanes][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const bool valid = col < width;
  double md = 0.0, ad = 0.0;
  if (ty == 0 && valid) {
    md = mean[col];
    ad = acc[col];
  }
  double n = static_cast<double>(n0);
  bool touched = false;
  for (int b = 0; b < blocks.nblocks; ++b) {
    const int64_t m = blocks.rows[b];
    if (m == 0) continue;  // uniform over the CTA: no divergence around __syncthreads
    const T* x = static_cast<const T*>(blocks.ptr[b]);
    // Sums in float64, as the CPU kernel's: S2 - S1 * S1 / m cancels, and float32
    // partial sums lost up to a few times the default kernel's accuracy when the
    // block's first row is far from its mean (found by emulating this loop on the CPU).
    double s1 = 0.0, s2 = 0.0;
    double x0 = 0.0;
    if (valid) {
      x0 = static_cast<double>(ld_f(x + col));
      for (int64_t r = 1 + ty; r < m; r += kRowLanes) {
        const double d = static_cast<double>(ld_f(x + r * width + col)) - x0;
        s1 += d;
        s2 = fma(d, d, s2);
      }
    }
    sh1[ty][tx] = s1;
    sh2[ty][tx] = s2;
    __syncthreads();
    if (ty == 0 && valid) {
      double S1 = 0.0, S2 = 0.0;
#pragma unroll
      for (int i = 0; i < kRowLanes; ++i) {
        S1 += sh1[i][tx];
        S2 += sh2[i][tx];
      }
      const double mdb = static_cast<double>(m);
      const double n_new = n + mdb;
      const double off = S1 / mdb;                        // block mean - x0
      const double m2 = fmax(S2 - S1 * off, 0.0);         // sum of squared deviations
      const double var_scale = m > 1 ? mdb / (mdb - 1.0) : 0.0;  // m * var_rows; 0 for one row
      const double delta = (static_cast<double>(x0) + off) - md;
      md += delta * (mdb / n_new);
      ad += var_scale * m2 + delta * delta * (n * mdb / n_new);
    }
    __syncthreads();  // shared memory is reused by the next block
    n += static_cast<double>(m);
    touched = true;
  }
  if (ty == 0 && valid && touched) {
    mean[col] = static_cast<float>(md);
    const float a = static_cast<float>(ad);
    acc[col] = a;
    stdv[col] = static_cast<float>(sqrt(static_cast<double>(a) / (n - 1.0 + kEps)));
  }
}

void launch_normalizer(const std::vector<at::Tensor>& xs, const std::vector<int64_t>& rows,
                       int64_t width, int64_t n0, float* mean, float* acc, float* stdv,
                       at::ScalarType dtype, cudaStream_t stream) {
  if (width == 0) return;
  // Chunks of kMaxBlocks blocks; each launch leaves a consistent state and the
  // next one starts from it (n advanced on the host).
  int64_t n = n0;
  for (size_t s = 0; s < xs.size(); s += kMaxBlocks) {
    NormBlocks nb{};
    nb.nblocks = static_cast<int>(std::min<size_t>(kMaxBlocks, xs.size() - s));
    for (int i = 0; i < nb.nblocks; ++i) {
      nb.ptr[i] = xs[s + i].data_ptr();
      nb.rows[i] = rows[s + i];
    }
    const dim3 grid(static_cast<unsigned>((width + kCols - 1) / kCols));
    const dim3 block(kCols, kRowLanes);
    UEF_CUDA_DISPATCH(dtype, "ultraedit_fast::normalizer_update_", [&] {
      normalizer_kernel<scalar_t><<<grid, block, 0, stream>>>(nb, width, n, mean, acc, stdv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    for (int i = 0; i < nb.nblocks; ++i) n += nb.rows[i];
  }
}

void normalizer_update_cuda(const at::Tensor& mean, const at::Tensor& acc, const at::Tensor& std_,
                            at::TensorList ks, at::TensorList gs, int64_t n) {
  const char* op = "ultraedit_fast::normalizer_update_";
  const int64_t D = checks::check_normalizer_state(mean, acc, std_, ks, gs, n, op);
  check_cuda_inputs(op, mean, "mean", {{&acc, "acc"}, {&std_, "std"}});
  if (ks.empty()) return;
  const int64_t d_in = ks[0].dim() == 2 ? ks[0].size(1) : -1;
  const int64_t d_out = D - d_in;
  std::vector<at::Tensor> kc, gc;
  std::vector<int64_t> rows;
  bool k_same = true, g_same = true;
  for (size_t i = 0; i < ks.size(); ++i) {
    const at::Tensor& k = ks[i];
    const at::Tensor& g = gs[i];
    checks::check_normalizer_block(k, g, i, d_in, d_out, op);
    check_cuda_same_device(k, mean, op, "ks[i]");
    check_cuda_same_device(g, mean, op, "gs[i]");
    k_same = k_same && k.scalar_type() == ks[0].scalar_type();
    g_same = g_same && g.scalar_type() == gs[0].scalar_type();
    kc.push_back(k.contiguous());
    gc.push_back(g.contiguous());
    rows.push_back(k.size(0));
  }
  // One kernel instantiation per launch: mixed dtypes in a list are widened to float32.
  if (!k_same) for (auto& t : kc) t = t.to(at::kFloat);
  if (!g_same) for (auto& t : gc) t = t.to(at::kFloat);
  const c10::cuda::CUDAGuard guard(mean.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch_normalizer(kc, rows, d_in, n, mean.data_ptr<float>(), acc.data_ptr<float>(),
                    std_.data_ptr<float>(), kc[0].scalar_type(), stream);
  launch_normalizer(gc, rows, d_out, n, mean.data_ptr<float>() + d_in,
                    acc.data_ptr<float>() + d_in, std_.data_ptr<float>() + d_in,
                    gc[0].scalar_type(), stream);
}

// ================================================================== shift_values
// One CTA per row: pass over k's row for |k_hat|^2 (block reduction), then one
// pass over g's row writing V.  Each element of k and g is read once.
constexpr int kShiftThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* shared /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < nwarps) ? shared[threadIdx.x] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

template <typename KT, typename GT>
__global__ void __launch_bounds__(kShiftThreads)
    shift_values_kernel(const KT* __restrict__ k, const GT* __restrict__ g,
                        const float* __restrict__ mean, const float* __restrict__ stdv,
                        float* __restrict__ V, int64_t d_in, int64_t d_out, float neg_lr) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const KT* kr = k + r * d_in;
  const GT* gr = g + r * d_out;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < d_in; j += blockDim.x) {
    const float z = __fdiv_rn(ld_f(kr + j) - mean[j], stdv[j] + kEps);
    s = fmaf(z, z, s);
  }
  const float scale = neg_lr * block_sum(s, red);
  const float* gm = mean + d_in;
  const float* gs = stdv + d_in;
  float* vr = V + r * d_out;
  for (int64_t j = threadIdx.x; j < d_out; j += blockDim.x)
    vr[j] = scale * __fdiv_rn(ld_f(gr + j) - gm[j], gs[j] + kEps);
}

at::Tensor shift_values_cuda(const at::Tensor& k, const at::Tensor& g, const at::Tensor& mean,
                             const at::Tensor& std_, double lr) {
  const char* op = "ultraedit_fast::shift_values";
  const checks::ShiftSizes sz = checks::check_shift_values_args(k, g, mean, std_, op);
  const int64_t N = sz.N, d_in = sz.d_in, d_out = sz.d_out;
  check_cuda_inputs(op, k, "k", {{&g, "g"}, {&mean, "mean"}, {&std_, "std"}});
  TORCH_CHECK(N <= 0x7fffffff, op, ": too many rows for one launch (", N, ")");
  at::Tensor V = at::empty({N, d_out}, k.options().dtype(at::kFloat));
  if (N == 0 || d_out == 0) return V;
  const c10::cuda::CUDAGuard guard(k.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor kc = k.contiguous(), gc = g.contiguous();
  at::Tensor mu = mean.contiguous(), sd = std_.contiguous();
  const float neg_lr = static_cast<float>(-lr);
  UEF_CUDA_DISPATCH(kc.scalar_type(), op, [&] {
    using k_t = scalar_t;
    UEF_CUDA_DISPATCH(gc.scalar_type(), op, [&] {
      using g_t = scalar_t;
      shift_values_kernel<k_t, g_t><<<static_cast<unsigned>(N), kShiftThreads, 0, stream>>>(
          kc.data_ptr<k_t>(), gc.data_ptr<g_t>(), mu.data_ptr<float>(), sd.data_ptr<float>(),
          V.data_ptr<float>(), d_in, d_out, neg_lr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return V;
}

// ================================================================== rank_update_
// w (R x C) += L^T Rm with L: N x R, Rm: N x C, both row-major float32
// (L = a, Rm = k for nn.Linear; L = k, Rm = a for Conv1D).  A tiled SIMT
// float32 GEMM: a CTA owns a kBM x kBN tile of w, walks N in steps of kBK
// staging L[kk, r0:r0+kBM] and Rm[kk, c0:c0+kBN] (contiguous rows: coalesced)
// in shared memory, each thread accumulates an 8 x 8 micro-tile in registers,
// and the epilogue reads w's tile, adds, and rounds once into w's dtype.
// float32 FMA throughout (no tensor cores, which would round a and k): the
// path of a float32 w, and of a 16-bit w on devices without TF32 tensor cores.
constexpr int kBM = 128, kBN = 128, kBK = 8;
constexpr int kRankThreads = 256;  // 16 x 16 threads, 8 x 8 outputs each

template <typename T>
__global__ void __launch_bounds__(kRankThreads)
    rank_update_kernel(T* __restrict__ w, int64_t ws0, int64_t ws1, const float* __restrict__ L,
                       const float* __restrict__ Rm, int64_t N, int64_t R, int64_t C) {
  __shared__ float As[kBK][kBM];
  __shared__ float Bs[kBK][kBN];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kBN;
  // Loader mapping: 256 threads x 4 floats = one kBK x 128 slab.
  const int lk = tid / 32;        // 0..7: which of the kBK rows
  const int lc = (tid % 32) * 4;  // 0..124: first of 4 consecutive columns

  float accum[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) accum[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < N; k0 += kBK) {
    const int64_t kk = k0 + lk;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t r = r0 + lc + q, c = c0 + lc + q;
      As[lk][lc + q] = (kk < N && r < R) ? L[kk * R + r] : 0.f;
      Bs[lk][lc + q] = (kk < N && c < C) ? Rm[kk * C + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kBK; ++s) {
      float av[8], bv[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = As[s][ty + 16 * i];  // broadcast in a half-warp
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = Bs[s][tx + 16 * j];  // consecutive: no bank conflict
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) accum[i][j] = fmaf(av[i], bv[j], accum[i][j]);
    }
    __syncthreads();
  }
  // Epilogue: one read and one rounded write of each element of w.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    if (r >= R) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c >= C) continue;
      T* p = w + r * ws0 + c * ws1;
      *p = static_cast<T>(ld_f(p) + accum[i][j]);
    }
  }
}

// ------------------------------------------------------------------ tensor-core path
// For a 16-bit w (bf16/fp16) on sm_80+: the same update on the tensor cores,
// WMMA m16n16k8 with TF32 operands and float32 accumulators.  Each operand is
// rounded to TF32 with wmma::__float_to_tf32 (cvt.rna: to nearest, ties away;
// unbiased, unlike the truncation the tensor cores apply to unrounded fp32
// bits), so a product's relative error is < 2^-10 and the update's error is
// < 2^-10 * sum_i |a_i| |k_i| plus the float32 accumulation's.  Why TF32 and
// not bf16 operands: the result is rounded into a 16-bit w anyway, and a
// TF32 operand's error (<= 2^-11 relative) is under half a bf16 ulp (2^-9 to
// 2^-8 relative) and at most half an fp16 ulp, while a bf16 operand's (2^-9)
// is as large as w's own rounding: bf16 operands (what
// w.addmm_(a.t().bfloat16(), k.bfloat16()) does) flip four to nine times as
// many roundings of w as TF32 operands (emulated in float64: 4x for updates
// as large as w, 7-9x for edit-sized ones; truncated TF32 operands, 2-3x).
// TF32 costs twice the tensor-core time of bf16 per flop; that is the price
// of the accuracy.
//
// CTA: a kTcBM x kTcBN tile of w, 8 warps as 2 (rows) x 4 (columns), each warp
// a 64 x 32 block of 4 x 2 accumulator fragments.  The contraction over N runs
// in steps of kTcBK rows of L and Rm, staged in shared memory by cp.async
// (16-byte copies when R and C are multiples of 4 and the rows 16-byte
// aligned, else 4-byte ones; zero-filled past the edges), two stages deep so
// the next step's copies fly while the tensor cores work on this one.  Shared
// layouts: As[k][m] (L's rows as they are: A = L^T is column-major, ld kTcLd)
// and Bs[k][n] (B = Rm row-major, ld kTcLd), rows padded by 8 floats: if the
// fragments follow mma.m16n8k8's layout (WMMA's is not documented), a load's
// lanes (row t, column g; t < 4, g < 8) hit 32 distinct banks (8t + g), where
// a pad of 4 gives two-way conflicts.  The GPT-2 Conv1D layout is the same
// product with L and Rm swapped: it runs here too, no fallback.
// Epilogue: the accumulators go through shared memory (WMMA's fragment layout
// is opaque) and each thread then reads w, adds, rounds once and writes: 8
// consecutive elements (16 bytes) per access when w's rows are contiguous and
// 16-byte aligned and the tile is whole, element by element otherwise
// (strided w, e.g. a transposed view, and the edge tiles).
// Resources (nvcc 13.0, sm_80 and sm_90): 128 registers (capped for 2 CTAs per
// SM), no spills, 68 KB of dynamic shared memory; SASS: HMMA.1684.F32.TF32,
// LDGSTS.128, 32-bit LDS, LDG/STG.128 in the epilogue.  UNMEASURED.  This is
// mma.sync, not Hopper's wgmma: on an H100 expect it well short of the
// Triton kernel (wgmma) and of torch's bf16 addmm_; benchmarks/bench_ops.py
// times both.
constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32, kTcPad = 8;
constexpr int kTcLd = kTcBM + kTcPad;  // floats per shared row (A, B and the epilogue's C)
constexpr int kTcThreads = 256;
constexpr int kTcStageFloats = 2 * kTcBK * kTcLd;  // A and B tiles of one stage
constexpr int kTcSmemBytes = 2 * kTcStageFloats * static_cast<int>(sizeof(float));  // 69632
static_assert(kTcBM == kTcBN, "one padded row length serves A, B and C");
static_assert(kTcBM * kTcLd <= 2 * kTcStageFloats, "the epilogue's C tile reuses the stages");

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// VEC consecutive floats from global to shared; zero-filled when !valid (the
// source is then not read, but must still be a valid address).
template <int VEC>
__device__ __forceinline__ void cp_async_floats(float* dst, const float* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? VEC * 4 : 0;
  if constexpr (VEC == 4) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(bytes) : "memory");
  } else {
    static_assert(VEC == 1, "VEC is 4 or 1");
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src),
                 "r"(bytes) : "memory");
  }
}

// A thread's share of the copies of one stage: column m of the tile (VEC
// floats), rows kk0, kk0 + kRowStep, ... of the kTcBK rows of the step.
template <int VEC>
struct TcLoader {
  static constexpr int kPerRow = kTcBM / VEC;             // copies per tile row
  static constexpr int kRowStep = kTcThreads / kPerRow;   // tile rows per sweep of the CTA
  static constexpr int kIters = kTcBK / kRowStep;
  static_assert(kTcThreads % kPerRow == 0 && kTcBK % kRowStep == 0, "whole sweeps");

  const float* l;  // L[kk0 + k0, r0 + m] for the current step k0
  const float* r;  // Rm[kk0 + k0, c0 + m]
  int64_t l_row, r_row;  // R, C: one row of L, Rm
  int kk0, m;
  bool l_ok, r_ok;  // column inside R, C (with VEC = 4 R and C are multiples of 4:
                    // a copy is wholly inside or outside)

  __device__ __forceinline__ TcLoader(const float* L, const float* Rm, int64_t R, int64_t C,
                                      int64_t r0, int64_t c0) {
    const int tid = threadIdx.x;
    kk0 = tid / kPerRow;
    m = (tid % kPerRow) * VEC;
    l_row = R;
    r_row = C;
    l_ok = r0 + m < R;
    r_ok = c0 + m < C;
    l = L + kk0 * R + r0 + m;
    r = Rm + kk0 * C + c0 + m;
  }

  // Issue the copies of the step starting at row k0, then advance to the next step.
  __device__ __forceinline__ void load(float* As, float* Bs, int64_t k0, int64_t N,
                                       const float* L, const float* Rm) {
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int kk = kk0 + i * kRowStep;
      const bool in_k = k0 + kk < N;
      const bool va = in_k && l_ok, vb = in_k && r_ok;
      cp_async_floats<VEC>(As + kk * kTcLd + m, va ? l + i * kRowStep * l_row : L, va);
      cp_async_floats<VEC>(Bs + kk * kTcLd + m, vb ? r + i * kRowStep * r_row : Rm, vb);
    }
    l += kTcBK * l_row;
    r += kTcBK * r_row;
  }
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// wmma::load_matrix_sync of a TF32 fragment (A: 16 x 8 column-major, B: 8 x 16
// row-major, ld kTcLd) from shared memory, each element then rounded to TF32 to
// nearest (wmma::__float_to_tf32).  The PTX names the shared state space: the
// API's generic-pointer version compiles to generic 64-bit loads (LD.E), which
// nvcc does not narrow to shared ones even for a __shared__ array.
template <bool kMatrixA>
__device__ __forceinline__ void load_tf32_fragment(float (&x)[4], const float* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  unsigned r0, r1, r2, r3;
  if constexpr (kMatrixA) {
    asm volatile("wmma.load.a.sync.aligned.col.m16n16k8.shared.tf32 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr), "r"(kTcLd)
                 : "memory");
  } else {
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k8.shared.tf32 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr), "r"(kTcLd)
                 : "memory");
  }
  x[0] = nvcuda::wmma::__float_to_tf32(__uint_as_float(r0));
  x[1] = nvcuda::wmma::__float_to_tf32(__uint_as_float(r1));
  x[2] = nvcuda::wmma::__float_to_tf32(__uint_as_float(r2));
  x[3] = nvcuda::wmma::__float_to_tf32(__uint_as_float(r3));
}

// wmma::store_matrix_sync of an m16n16k8 float accumulator into shared memory
// (row-major, ld kTcLd), likewise with the shared state space named.
__device__ __forceinline__ void store_accumulator(float* smem, const float (&x)[8]) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile(
      "wmma.store.d.sync.aligned.row.m16n16k8.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, "
      "%8}, %9;\n" ::"r"(addr),
      "f"(x[0]), "f"(x[1]), "f"(x[2]), "f"(x[3]), "f"(x[4]), "f"(x[5]), "f"(x[6]), "f"(x[7]),
      "r"(kTcLd)
      : "memory");
}
#endif

template <typename T>
__device__ __forceinline__ uint16_t bits_of(T v) { return v.x; }
template <typename T>
__device__ __forceinline__ T from_bits(uint16_t b) { return T(b, T::from_bits()); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kTcThreads, 2)
    rank_update_tc_kernel(T* __restrict__ w, int64_t ws0, int64_t ws1,
                          const float* __restrict__ L, const float* __restrict__ Rm, int64_t N,
                          int64_t R, int64_t C, bool w_vec16) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) float tc_smem[];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;  // this warp's 64 x 32 block of the tile
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTcBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTcBN;

  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int64_t steps = (N + kTcBK - 1) / kTcBK;
  TcLoader<VEC> loader(L, Rm, R, C, r0, c0);
  loader.load(tc_smem, tc_smem + kTcBK * kTcLd, 0, N, L, Rm);
  cp_async_commit();
  for (int64_t t = 0; t < steps; ++t) {
    float* As = tc_smem + (t & 1) * kTcStageFloats;
    float* Bs = As + kTcBK * kTcLd;
    if (t + 1 < steps) {
      // The other stage was last read in step t - 1, which ended with a barrier.
      float* An = tc_smem + ((t + 1) & 1) * kTcStageFloats;
      loader.load(An, An + kTcBK * kTcLd, (t + 1) * kTcBK, N, L, Rm);
      cp_async_commit();
      cp_async_wait<1>();  // this step's copies are done, the next step's may fly
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kTcBK; ks += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> af[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> bf[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        load_tf32_fragment<true>(af[i].x, As + ks * kTcLd + wm * 64 + i * 16);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        load_tf32_fragment<false>(bf[j].x, Bs + ks * kTcLd + wn * 32 + j * 16);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
    __syncthreads();  // before the next step's copies overwrite this stage
  }

  // Epilogue: C tile (kTcBM x kTcBN, ld kTcLd) in the stages' shared memory.
  float* Cs = tc_smem;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      store_accumulator(Cs + (wm * 64 + i * 16) * kTcLd + wn * 32 + j * 16, acc[i][j].x);
  __syncthreads();
  const int64_t rows = R - r0 < kTcBM ? R - r0 : kTcBM;
  const int64_t cols = C - c0 < kTcBN ? C - c0 : kTcBN;
  if (w_vec16 && rows == kTcBM && cols == kTcBN) {
    // 16 threads per tile row, 8 elements (16 bytes) each: a warp writes two
    // 256-byte row segments.
    constexpr int kChunks = kTcBN / 8;
#pragma unroll 4
    for (int idx = tid; idx < kTcBM * kChunks; idx += kTcThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      uint4* p = reinterpret_cast<uint4*>(w + (r0 + r) * ws0 + c0 + c);
      uint4 v = *p;
      uint32_t word[4] = {v.x, v.y, v.z, v.w};
      const float* cr = Cs + r * kTcLd + c;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float lo = static_cast<float>(from_bits<T>(word[e] & 0xFFFFu)) + cr[2 * e];
        const float hi = static_cast<float>(from_bits<T>(word[e] >> 16)) + cr[2 * e + 1];
        word[e] = static_cast<uint32_t>(bits_of(T(lo))) |
                  (static_cast<uint32_t>(bits_of(T(hi))) << 16);
      }
      *p = make_uint4(word[0], word[1], word[2], word[3]);
    }
  } else {
    for (int idx = tid; idx < kTcBM * kTcBN; idx += kTcThreads) {
      const int r = idx / kTcBN, c = idx % kTcBN;
      if (r >= rows || c >= cols) continue;
      T* p = w + (r0 + r) * ws0 + (c0 + c) * ws1;
      *p = static_cast<T>(ld_f(p) + Cs[r * kTcLd + c]);
    }
  }
#else
  // Built without sm_80+ code (a TORCH_CUDA_ARCH_LIST below 8.0) yet launched on an
  // sm_80+ device through PTX JIT: fail loudly rather than leave w unchanged.
  __trap();
#endif
}

// Whether this device has TF32 tensor cores (sm_80+).
bool device_has_tf32_mma(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

template <typename T>
void launch_rank_update_tc(const at::Tensor& w, const at::Tensor& L, const at::Tensor& Rm,
                           int64_t N, int64_t R, int64_t C, cudaStream_t stream) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec_in = R % 4 == 0 && C % 4 == 0 && aligned16(L.data_ptr()) &&
                      aligned16(Rm.data_ptr());
  const bool w_vec16 = w.stride(1) == 1 && w.stride(0) % 8 == 0 && aligned16(w.data_ptr());
  const dim3 grid(static_cast<unsigned>((C + kTcBN - 1) / kTcBN),
                  static_cast<unsigned>((R + kTcBM - 1) / kTcBM));
  auto run = [&](auto kernel) {
    // More than 48 KB of dynamic shared memory needs an opt-in (per device, cheap).
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kTcSmemBytes));
    kernel<<<grid, kTcThreads, kTcSmemBytes, stream>>>(
        static_cast<T*>(w.data_ptr()), w.stride(0), w.stride(1), L.data_ptr<float>(),
        Rm.data_ptr<float>(), N, R, C, w_vec16);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec_in)
    run(rank_update_tc_kernel<T, 4>);
  else
    run(rank_update_tc_kernel<T, 1>);
}

void rank_update_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& k,
                      bool transposed) {
  const char* op = "ultraedit_fast::rank_update_";
  const checks::RankSizes sz = checks::check_rank_update_args(w, a, k, transposed, op);
  const int64_t N = sz.N, R = sz.R, C = sz.C;
  check_cuda_inputs(op, w, "w", {{&a, "a"}, {&k, "k"}});
  if (N == 0 || w.numel() == 0) return;
  const int64_t tiles_r = (R + kBM - 1) / kBM, tiles_c = (C + kBN - 1) / kBN;
  TORCH_CHECK(tiles_r <= 65535, op, ": w has too many rows for one launch (", R, ")");
  const c10::cuda::CUDAGuard guard(w.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor a32 = a.to(at::kFloat).contiguous();  // small (N rows)
  at::Tensor k32 = k.to(at::kFloat).contiguous();
  const at::Tensor& L = transposed ? k32 : a32;
  const at::Tensor& Rm = transposed ? a32 : k32;
  static_assert(kTcBM == kBM, "tiles_r above bounds both kernels' grids");
  if (w.scalar_type() != at::kFloat && device_has_tf32_mma(w.get_device())) {
    // 16-bit w: TF32 tensor cores (precision: the comment above rank_update_tc_kernel).
    if (w.scalar_type() == at::kBFloat16)
      launch_rank_update_tc<c10::BFloat16>(w, L, Rm, N, R, C, stream);
    else
      launch_rank_update_tc<c10::Half>(w, L, Rm, N, R, C, stream);
    return;
  }
  const dim3 grid(static_cast<unsigned>(tiles_c), static_cast<unsigned>(tiles_r));
  UEF_CUDA_DISPATCH(w.scalar_type(), op, [&] {
    rank_update_kernel<scalar_t><<<grid, kRankThreads, 0, stream>>>(
        static_cast<scalar_t*>(w.data_ptr()), w.stride(0), w.stride(1), L.data_ptr<float>(),
        Rm.data_ptr<float>(), N, R, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ultraedit_fast, CUDA, m) {
  m.impl("normalizer_update_", &normalizer_update_cuda);
  m.impl("shift_values", &shift_values_cuda);
  m.impl("rank_update_", &rank_update_cuda);
}

}  // namespace ultraedit_fast
