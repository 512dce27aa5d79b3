// pybind11 bindings of the CPU kernels: shape/dtype checks and torch tensor plumbing only.
// The only translation unit that includes torch headers, so editing a kernel recompiles quickly.
#include <torch/extension.h>

#include "fused_kl.h"
#include "scaled_masked_softmax.h"

namespace {

mki::DType kernel_dtype(const at::Tensor& x, const char* what) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return mki::DType::kFloat32;
    case at::kHalf:
      return mki::DType::kFloat16;
    case at::kBFloat16:
      return mki::DType::kBFloat16;
    case at::kDouble:
      return mki::DType::kFloat64;
    default:
      TORCH_CHECK(false, "megatron_ki cpu kernels: ", what, " must be float32, float16, bfloat16 or float64, got ",
                  x.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "megatron_ki cpu kernels: ", what, " must be a CPU tensor");
}

void check_logits(const at::Tensor& s, const at::Tensor& t) {
  check_cpu(s, "student_logits");
  check_cpu(t, "teacher_logits");
  TORCH_CHECK(s.dim() == 2, "fused_kl: student_logits must be [N, V], got ", s.sizes());
  TORCH_CHECK(t.sizes() == s.sizes(), "fused_kl: teacher_logits ", t.sizes(), " must match student_logits ",
              s.sizes());
  TORCH_CHECK(t.scalar_type() == s.scalar_type(), "fused_kl: teacher and student logits must share a dtype");
  TORCH_CHECK(s.size(1) <= 1 || (s.stride(1) == 1 && t.stride(1) == 1),
              "fused_kl: logits must be contiguous along the vocabulary");
}

at::Tensor rows_arg(const at::Tensor& x, int64_t n, at::ScalarType acc, const char* what) {
  check_cpu(x, what);
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "fused_kl.kl_backward: ", what, " must be [", n, "], got ",
              x.sizes());
  return x.to(acc).contiguous();
}

at::Tensor kl_forward_stats(const at::Tensor& s, const at::Tensor& t, double temperature) {
  check_logits(s, t);
  TORCH_CHECK(temperature > 0, "fused_kl: temperature must be > 0, got ", temperature);
  const int64_t n = s.size(0), v = s.size(1);
  at::Tensor stats = at::empty({n, 7}, s.options().dtype(acc_type(s)));
  {
    pybind11::gil_scoped_release release;
    mki::kl_forward_stats_cpu(s.data_ptr(), t.data_ptr(), kernel_dtype(s, "logits"), n, v, s.stride(0),
                              t.stride(0), temperature, stats.data_ptr(), at::get_num_threads());
  }
  return stats;
}

at::Tensor kl_backward(const at::Tensor& s, const at::Tensor& t, double temperature, const at::Tensor& lse_s,
                       const at::Tensor& lse_t, const at::Tensor& row_value, const at::Tensor& grad_rows,
                       int64_t mode) {
  check_logits(s, t);
  TORCH_CHECK(temperature > 0, "fused_kl: temperature must be > 0, got ", temperature);
  TORCH_CHECK(mode == mki::kKlForward || mode == mki::kKlReverse, "fused_kl.kl_backward: bad mode ", mode);
  const int64_t n = s.size(0), v = s.size(1);
  const at::ScalarType acc = acc_type(s);
  at::Tensor ls = rows_arg(lse_s, n, acc, "lse_s");
  at::Tensor lt = rows_arg(lse_t, n, acc, "lse_t");
  at::Tensor rv = rows_arg(row_value, n, acc, "row_value");
  at::Tensor g = rows_arg(grad_rows, n, acc, "grad_rows");
  at::Tensor grad = at::empty({n, v}, s.options().memory_format(at::MemoryFormat::Contiguous));
  {
    pybind11::gil_scoped_release release;
    mki::kl_backward_cpu(s.data_ptr(), t.data_ptr(), kernel_dtype(s, "logits"), n, v, s.stride(0), t.stride(0),
                         temperature, ls.data_ptr(), lt.data_ptr(), rv.data_ptr(), g.data_ptr(),
                         static_cast<int>(mode), grad.data_ptr(), at::get_num_threads());
  }
  return grad;
}

at::Tensor softmax_forward(const at::Tensor& x, const c10::optional<at::Tensor>& mask, double scale,
                           bool causal) {
  check_cpu(x, "scores");
  TORCH_CHECK(x.dim() == 4, "scaled_masked_softmax: scores must be [b, heads, sq, sk], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "scaled_masked_softmax: scores must be contiguous");
  TORCH_CHECK(!causal || x.size(2) == x.size(3), "scaled_upper_triang_masked_softmax: needs sq == sk, got ",
              x.sizes());
  int64_t strides[4] = {0, 0, 0, 0};
  const uint8_t* mask_ptr = nullptr;
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    check_cpu(*mask, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "scaled_masked_softmax: mask must be bool (True = masked)");
    m = mask->expand(x.sizes());
    for (int i = 0; i < 4; ++i) strides[i] = m.stride(i);
    mask_ptr = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  }
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  {
    pybind11::gil_scoped_release release;
    mki::scaled_masked_softmax_forward_cpu(x.data_ptr(), kernel_dtype(x, "scores"), y.data_ptr(), x.size(0),
                                           x.size(1), x.size(2), x.size(3), scale, mask_ptr, strides,
                                           causal ? 1 : 0, at::get_num_threads());
  }
  return y;
}

at::Tensor softmax_backward(const at::Tensor& grad_y, const at::Tensor& probs, double scale) {
  check_cpu(grad_y, "grad");
  check_cpu(probs, "probs");
  TORCH_CHECK(grad_y.sizes() == probs.sizes() && grad_y.scalar_type() == probs.scalar_type(),
              "scaled_masked_softmax backward: grad and probs must match in shape and dtype");
  TORCH_CHECK(probs.dim() >= 1, "scaled_masked_softmax backward: probs must have a last dimension");
  at::Tensor g = grad_y.contiguous();
  at::Tensor p = probs.contiguous();
  const int64_t sk = p.size(-1);
  const int64_t rows = sk == 0 ? 0 : p.numel() / sk;
  at::Tensor gx = at::empty_like(p, at::MemoryFormat::Contiguous);
  {
    pybind11::gil_scoped_release release;
    mki::scaled_masked_softmax_backward_cpu(g.data_ptr(), p.data_ptr(), kernel_dtype(p, "probs"), gx.data_ptr(),
                                            rows, sk, scale, at::get_num_threads());
  }
  return gx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_ki fused CPU kernels (KL divergence statistics, scaled masked softmax)";
  m.def("kl_forward_stats", &kl_forward_stats, "per-row [m_s, Z_s, m_t, Z_t, A, B, C] of the KL contract");
  m.def("kl_backward", &kl_backward, "gradient of the per-row KL w.r.t. the student logits");
  m.def("softmax_forward", &softmax_forward, "scaled (masked / causal) softmax forward");
  m.def("softmax_backward", &softmax_backward, "scaled softmax backward: scale * p * (g - sum(g p))");
}
