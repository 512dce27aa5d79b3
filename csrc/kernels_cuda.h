// Host-side launchers of the CUDA kernels (fused_kl_cuda.cu, scaled_masked_softmax_cuda.cu).
// Plain C++ with raw pointers and a stream, so the torch binding (cuda_bindings.cpp) needs no CUDA sources
// and the .cu files need no torch headers. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace mki {

// Same contracts as the CPU versions in fused_kl.h / scaled_masked_softmax.h.
cudaError_t kl_forward_stats_cuda(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                                  int64_t ld_t, double temperature, void* stats, cudaStream_t stream);

cudaError_t kl_backward_cuda(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                             int64_t ld_t, double temperature, const void* lse_s, const void* lse_t,
                             const void* row_value, const void* grad_rows, int mode, void* grad,
                             cudaStream_t stream);

cudaError_t scaled_masked_softmax_forward_cuda(const void* x, DType dtype, void* y, int64_t b, int64_t h,
                                               int64_t sq, int64_t sk, double scale, const uint8_t* mask,
                                               const int64_t* mask_strides, int causal, cudaStream_t stream);

cudaError_t scaled_masked_softmax_backward_cuda(const void* grad_y, const void* probs, DType dtype, void* grad_x,
                                                int64_t rows, int64_t sk, double scale, cudaStream_t stream);

}  // namespace mki
