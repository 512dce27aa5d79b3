// Fused KL-divergence statistics and gradient on CPU (OpenMP over rows), on raw pointers.
//
// Contract (see megatron_ki/kernels/kl.py): for each row of student logits s and teacher logits t
// ([n, v], row strides ld_s / ld_t, unit stride along v), with x/tau written x':
//   stats[row] = {m_s, Z_s, m_t, Z_t, A, B, C}
//   m = max(x'), Z = sum exp(x' - m), A = sum exp(t' - m_t)(t' - s'), B = sum exp(s' - m_s)(s' - t'),
//   C = sum exp(t' - m_t)(t' - m_t).
// An all -inf row gives m = -inf, Z = A = B = C = 0 (no NaN), so vocab slices merge cleanly.
// Stats and per-row inputs are fp32 (fp64 when the logits are fp64).
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace mki {

void kl_forward_stats_cpu(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                          int64_t ld_t, double temperature, void* stats, int num_threads);

// grad[row] = grad_rows[row] * dKL/ds for the chosen mode using the global (full-vocabulary) lse_s / lse_t;
// rows with grad_rows == 0 are written as exact zeros.
void kl_backward_cpu(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                     int64_t ld_t, double temperature, const void* lse_s, const void* lse_t,
                     const void* row_value, const void* grad_rows, int mode, void* grad, int num_threads);

}  // namespace mki
