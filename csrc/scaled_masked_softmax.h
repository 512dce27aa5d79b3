// Scaled masked softmax for attention scores on CPU (OpenMP over rows), on raw pointers.
//
// probs = softmax(scale * x) along the last dimension with masked entries set to exactly 0; a row whose
// entries are all masked gives all zeros (not NaN). fp32 math for 16-bit inputs, output in the input dtype.
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace mki {

// x, y: contiguous [b, h, sq, sk]. mask: nullptr or a byte tensor (nonzero = masked out) addressed with the
// element strides mask_strides[4] over (b, h, sq, sk), so broadcast masks need no copy (stride 0).
// causal != 0 masks key j > query i in addition (upper-triangular softmax, sq == sk).
void scaled_masked_softmax_forward_cpu(const void* x, DType dtype, void* y, int64_t b, int64_t h, int64_t sq,
                                       int64_t sk, double scale, const uint8_t* mask,
                                       const int64_t* mask_strides, int causal, int num_threads);

// grad_x = scale * p * (g - sum(g * p)) row by row; g, p, grad_x contiguous [rows, sk].
void scaled_masked_softmax_backward_cpu(const void* grad_y, const void* probs, DType dtype, void* grad_x,
                                        int64_t rows, int64_t sk, double scale, int num_threads);

}  // namespace mki
