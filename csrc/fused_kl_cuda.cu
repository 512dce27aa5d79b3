// CUDA fused KL statistics and gradient: one block per row, warp-shuffle reductions, fp32 accumulation for
// fp16/bf16/fp32 inputs (fp64 for fp64). Contract: see fused_kl.h.
//
// Forward: each thread walks its strided elements in tiles of kIlp, takes the tile maximum first and
// rescales its running sums only when the maximum grows (online max rescaling, ~1 exp per element per
// tensor); the per-thread states are merged with the same rescaling rule across the warp and the block.
#include <cmath>

#include "cuda_common.cuh"
#include "kernels_cuda.h"

namespace mki {
namespace cuda {
namespace {

constexpr int kIlp = 4;

template <typename A>
struct KlState {
  A m_s, z_s, m_t, z_t, a, b, c;
};

template <typename A>
__device__ __forceinline__ KlState<A> empty_state() {
  return KlState<A>{neg_inf<A>(), A(0), neg_inf<A>(), A(0), A(0), A(0), A(0)};
}

// Combine two partial states over disjoint element sets. A side with Z == 0 contributes nothing; C, which is
// measured from m_t itself, picks up (m_old - m_new) * Z when re-expressed relative to the new maximum.
template <typename A>
__device__ __forceinline__ KlState<A> merge(const KlState<A>& x, const KlState<A>& y) {
  KlState<A> r;
  r.m_s = fmax(x.m_s, y.m_s);
  const A fx_s = x.z_s > 0 ? exp_acc(x.m_s - r.m_s) : A(0);
  const A fy_s = y.z_s > 0 ? exp_acc(y.m_s - r.m_s) : A(0);
  r.z_s = x.z_s * fx_s + y.z_s * fy_s;
  r.b = x.b * fx_s + y.b * fy_s;
  r.m_t = fmax(x.m_t, y.m_t);
  const A dx = x.z_t > 0 ? x.m_t - r.m_t : A(0);
  const A dy = y.z_t > 0 ? y.m_t - r.m_t : A(0);
  const A fx_t = x.z_t > 0 ? exp_acc(dx) : A(0);
  const A fy_t = y.z_t > 0 ? exp_acc(dy) : A(0);
  r.z_t = x.z_t * fx_t + y.z_t * fy_t;
  r.a = x.a * fx_t + y.a * fy_t;
  r.c = fx_t * (x.c + dx * x.z_t) + fy_t * (y.c + dy * y.z_t);
  return r;
}

template <typename A>
__device__ __forceinline__ KlState<A> shfl_xor(const KlState<A>& s, int offset) {
  KlState<A> r;
  r.m_s = __shfl_xor_sync(0xffffffffu, s.m_s, offset);
  r.z_s = __shfl_xor_sync(0xffffffffu, s.z_s, offset);
  r.m_t = __shfl_xor_sync(0xffffffffu, s.m_t, offset);
  r.z_t = __shfl_xor_sync(0xffffffffu, s.z_t, offset);
  r.a = __shfl_xor_sync(0xffffffffu, s.a, offset);
  r.b = __shfl_xor_sync(0xffffffffu, s.b, offset);
  r.c = __shfl_xor_sync(0xffffffffu, s.c, offset);
  return r;
}

template <typename T>
__global__ void kl_stats_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t v, int64_t ld_s,
                                int64_t ld_t, typename Acc<T>::type inv_tau, typename Acc<T>::type* stats) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x;
  const T* sr = s + row * ld_s;
  const T* tr = t + row * ld_t;
  KlState<A> st = empty_state<A>();
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kIlp;
  for (int64_t base = 0; base < v; base += tile) {
    A xs[kIlp], xt[kIlp];
    A cms = neg_inf<A>(), cmt = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t j = base + static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
      xs[k] = j < v ? static_cast<A>(load(sr, j)) * inv_tau : neg_inf<A>();
      xt[k] = j < v ? static_cast<A>(load(tr, j)) * inv_tau : neg_inf<A>();
      cms = fmax(cms, xs[k]);
      cmt = fmax(cmt, xt[k]);
    }
    if (cms > st.m_s) {
      const A sc = st.z_s > 0 ? exp_acc(st.m_s - cms) : A(0);
      st.z_s *= sc;
      st.b *= sc;
      st.m_s = cms;
    }
    if (cmt > st.m_t) {
      if (st.z_t > 0) {
        const A delta = st.m_t - cmt;
        const A sc = exp_acc(delta);
        st.c = sc * (st.c + delta * st.z_t);
        st.z_t *= sc;
        st.a *= sc;
      }
      st.m_t = cmt;
    }
    const A ms0 = isinf(st.m_s) ? A(0) : st.m_s;  // -inf max: every entry so far is -inf, exp gives 0
    const A mt0 = isinf(st.m_t) ? A(0) : st.m_t;
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const A es = exp_acc(xs[k] - ms0);
      const A et = exp_acc(xt[k] - mt0);
      const A d = xt[k] - xs[k];
      st.z_s += es;
      st.z_t += et;
      st.a += et > 0 ? et * d : A(0);
      st.b -= es > 0 ? es * d : A(0);
      st.c += et > 0 ? et * (xt[k] - mt0) : A(0);
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) st = merge(st, shfl_xor(st, offset));
  __shared__ KlState<A> partial[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? partial[lane] : empty_state<A>();
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) st = merge(st, shfl_xor(st, offset));
    if (lane == 0) {
      A* out = stats + row * 7;
      out[0] = st.m_s;
      out[1] = st.z_s;
      out[2] = st.m_t;
      out[3] = st.z_t;
      out[4] = st.a;
      out[5] = st.b;
      out[6] = st.c;
    }
  }
}

template <typename T>
__global__ void kl_backward_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t v, int64_t ld_s,
                                   int64_t ld_t, typename Acc<T>::type inv_tau,
                                   const typename Acc<T>::type* __restrict__ lse_s,
                                   const typename Acc<T>::type* __restrict__ lse_t,
                                   const typename Acc<T>::type* __restrict__ row_value,
                                   const typename Acc<T>::type* __restrict__ grad_rows, int mode,
                                   T* __restrict__ grad) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x;
  const T* sr = s + row * ld_s;
  const T* tr = t + row * ld_t;
  T* out = grad + row * v;
  const A g = grad_rows[row];
  if (g == A(0)) {  // ignored row: exact zeros, whatever the logits hold
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) store(out, j, A(0));
    return;
  }
  const A ls = lse_s[row], lt = lse_t[row];
  const A ls0 = isinf(ls) ? A(0) : ls;
  const A lt0 = isinf(lt) ? A(0) : lt;
  const A scale = g * inv_tau;
  if (mode == kKlForward) {
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
      const A ps = exp_acc(static_cast<A>(load(sr, j)) * inv_tau - ls0);
      const A pt = exp_acc(static_cast<A>(load(tr, j)) * inv_tau - lt0);
      store(out, j, scale * (ps - pt));
    }
  } else {
    const A offset = lt - ls - row_value[row];
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
      const A xs = static_cast<A>(load(sr, j)) * inv_tau;
      const A xt = static_cast<A>(load(tr, j)) * inv_tau;
      const A ps = exp_acc(xs - ls0);
      store(out, j, ps > 0 ? scale * ps * (xs - xt + offset) : A(0));
    }
  }
}

template <typename T>
cudaError_t launch_stats(const void* s, const void* t, int64_t n, int64_t v, int64_t ld_s, int64_t ld_t,
                         double temperature, void* stats, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (n == 0) return cudaSuccess;
  kl_stats_kernel<T><<<grid_rows(n), kRowThreads, 0, stream>>>(
      static_cast<const T*>(s), static_cast<const T*>(t), v, ld_s, ld_t, static_cast<A>(1.0 / temperature),
      static_cast<A*>(stats));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* s, const void* t, int64_t n, int64_t v, int64_t ld_s, int64_t ld_t,
                            double temperature, const void* lse_s, const void* lse_t, const void* row_value,
                            const void* grad_rows, int mode, void* grad, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (n == 0) return cudaSuccess;
  kl_backward_kernel<T><<<grid_rows(n), kRowThreads, 0, stream>>>(
      static_cast<const T*>(s), static_cast<const T*>(t), v, ld_s, ld_t, static_cast<A>(1.0 / temperature),
      static_cast<const A*>(lse_s), static_cast<const A*>(lse_t), static_cast<const A*>(row_value),
      static_cast<const A*>(grad_rows), mode, static_cast<T*>(grad));
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t kl_forward_stats_cuda(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                                  int64_t ld_t, double temperature, void* stats, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return cuda::launch_stats<float>(s, t, n, v, ld_s, ld_t, temperature, stats, stream);
    case DType::kFloat16:
      return cuda::launch_stats<__half>(s, t, n, v, ld_s, ld_t, temperature, stats, stream);
    case DType::kBFloat16:
      return cuda::launch_stats<__nv_bfloat16>(s, t, n, v, ld_s, ld_t, temperature, stats, stream);
    case DType::kFloat64:
      return cuda::launch_stats<double>(s, t, n, v, ld_s, ld_t, temperature, stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kl_backward_cuda(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                             int64_t ld_t, double temperature, const void* lse_s, const void* lse_t,
                             const void* row_value, const void* grad_rows, int mode, void* grad,
                             cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return cuda::launch_backward<float>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value, grad_rows,
                                          mode, grad, stream);
    case DType::kFloat16:
      return cuda::launch_backward<__half>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value,
                                           grad_rows, mode, grad, stream);
    case DType::kBFloat16:
      return cuda::launch_backward<__nv_bfloat16>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value,
                                                  grad_rows, mode, grad, stream);
    case DType::kFloat64:
      return cuda::launch_backward<double>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value,
                                           grad_rows, mode, grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mki
