// CUDA scaled (masked / causal) softmax forward and backward: one block per row, fp32 math for 16-bit
// inputs, warp-shuffle reductions. Contract: see scaled_masked_softmax.h.
//
// Forward reads the row twice: an online (max, sum-exp) pass merged across the block, then the write pass.
#include <cmath>

#include "cuda_common.cuh"
#include "kernels_cuda.h"

namespace mki {
namespace cuda {
namespace {

constexpr int kSoftmaxThreads = 128;

struct MaskView {
  const uint8_t* ptr;  // nullptr: no mask
  int64_t sb, sh, sq, sk;  // element strides over (b, h, sq, sk); 0 on broadcast dimensions
};

template <typename A>
__device__ __forceinline__ void merge_max_sum(A& m, A& z, A m2, A z2) {
  const A mn = fmax(m, m2);
  const A f1 = z > 0 ? exp_acc(m - mn) : A(0);
  const A f2 = z2 > 0 ? exp_acc(m2 - mn) : A(0);
  z = z * f1 + z2 * f2;
  m = mn;
}

template <typename T>
__global__ void softmax_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t h, int64_t sq,
                                       int64_t sk, typename Acc<T>::type scale, MaskView mask, int causal) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x;
  const int64_t qi = row % sq;
  const int64_t hi = (row / sq) % h;
  const int64_t bi = row / (sq * h);
  const T* xr = x + row * sk;
  T* yr = y + row * sk;
  const uint8_t* mr = mask.ptr ? mask.ptr + bi * mask.sb + hi * mask.sh + qi * mask.sq : nullptr;
  const int64_t limit = causal ? qi + 1 : sk;

  auto value = [&](int64_t j) -> A {
    const bool masked = j >= limit || (mr != nullptr && mr[j * mask.sk] != 0);
    return masked ? neg_inf<A>() : static_cast<A>(load(xr, j)) * scale;
  };

  A m = neg_inf<A>(), z = A(0);
  for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) {
    const A v = value(j);
    if (v > m) {
      z = z > 0 ? z * exp_acc(m - v) : A(0);
      m = v;
    }
    z += isinf(m) ? A(0) : exp_acc(v - m);
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    merge_max_sum(m, z, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, z, offset));
  }
  __shared__ A part_m[kWarp], part_z[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) {
    part_m[warp] = m;
    part_z[warp] = z;
  }
  __syncthreads();
  m = lane < warps ? part_m[lane] : neg_inf<A>();
  z = lane < warps ? part_z[lane] : A(0);
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    merge_max_sum(m, z, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, z, offset));
  }
  // every lane of every warp now holds the row's (m, z); z == 0 means the row is fully masked
  const A inv = z > 0 ? A(1) / z : A(0);
  const A m0 = isinf(m) ? A(0) : m;
  for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) store(yr, j, exp_acc(value(j) - m0) * inv);
}

template <typename T>
__global__ void softmax_backward_kernel(const T* __restrict__ g, const T* __restrict__ p, T* __restrict__ gx,
                                        int64_t sk, typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x;
  const T* gr = g + row * sk;
  const T* pr = p + row * sk;
  T* out = gx + row * sk;
  A dot = 0;
  for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) dot += static_cast<A>(load(gr, j)) * load(pr, j);
  dot = block_sum(dot);
  for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) {
    const A pj = load(pr, j);
    store(out, j, scale * pj * (static_cast<A>(load(gr, j)) - dot));
  }
}

template <typename T>
cudaError_t launch_forward(const void* x, void* y, int64_t b, int64_t h, int64_t sq, int64_t sk, double scale,
                           const uint8_t* mask, const int64_t* ms, int causal, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t rows = b * h * sq;
  if (rows == 0 || sk == 0) return cudaSuccess;
  MaskView view{mask, 0, 0, 0, 0};
  if (mask != nullptr) view = MaskView{mask, ms[0], ms[1], ms[2], ms[3]};
  softmax_forward_kernel<T><<<grid_rows(rows), kSoftmaxThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(y), h, sq, sk, static_cast<A>(scale), view, causal);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* g, const void* p, void* gx, int64_t rows, int64_t sk, double scale,
                            cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (rows == 0 || sk == 0) return cudaSuccess;
  softmax_backward_kernel<T><<<grid_rows(rows), kSoftmaxThreads, 0, stream>>>(
      static_cast<const T*>(g), static_cast<const T*>(p), static_cast<T*>(gx), sk, static_cast<A>(scale));
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t scaled_masked_softmax_forward_cuda(const void* x, DType dtype, void* y, int64_t b, int64_t h,
                                               int64_t sq, int64_t sk, double scale, const uint8_t* mask,
                                               const int64_t* mask_strides, int causal, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return cuda::launch_forward<float>(x, y, b, h, sq, sk, scale, mask, mask_strides, causal, stream);
    case DType::kFloat16:
      return cuda::launch_forward<__half>(x, y, b, h, sq, sk, scale, mask, mask_strides, causal, stream);
    case DType::kBFloat16:
      return cuda::launch_forward<__nv_bfloat16>(x, y, b, h, sq, sk, scale, mask, mask_strides, causal, stream);
    case DType::kFloat64:
      return cuda::launch_forward<double>(x, y, b, h, sq, sk, scale, mask, mask_strides, causal, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t scaled_masked_softmax_backward_cuda(const void* grad_y, const void* probs, DType dtype, void* grad_x,
                                                int64_t rows, int64_t sk, double scale, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return cuda::launch_backward<float>(grad_y, probs, grad_x, rows, sk, scale, stream);
    case DType::kFloat16:
      return cuda::launch_backward<__half>(grad_y, probs, grad_x, rows, sk, scale, stream);
    case DType::kBFloat16:
      return cuda::launch_backward<__nv_bfloat16>(grad_y, probs, grad_x, rows, sk, scale, stream);
    case DType::kFloat64:
      return cuda::launch_backward<double>(grad_y, probs, grad_x, rows, sk, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mki
