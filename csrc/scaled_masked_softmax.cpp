// CPU implementation of the scaled (masked / causal) softmax forward and its backward.
#include "scaled_masked_softmax.h"

#include <cmath>
#include <vector>

namespace mki {
namespace {

template <typename T>
void forward_rows(const T* x, T* y, int64_t b, int64_t h, int64_t sq, int64_t sk, double scale_d,
                  const uint8_t* mask, const int64_t* ms, int causal, int num_threads) {
  using A = typename Acc<T>::type;
  const A scale = static_cast<A>(scale_d);
  const int64_t rows = b * h * sq;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<A> buf(static_cast<size_t>(sk));
    A* bp = buf.data();
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t qi = row % sq;
      const int64_t hi = (row / sq) % h;
      const int64_t bi = row / (sq * h);
      const T* xr = x + row * sk;
      T* yr = y + row * sk;
      const uint8_t* mr = mask ? mask + bi * ms[0] + hi * ms[1] + qi * ms[2] : nullptr;
      const int64_t mstride = mask ? ms[3] : 0;
      const int64_t limit = causal ? qi + 1 : sk;  // keys at or beyond limit are masked
      A m = neg_inf<A>();
      for (int64_t j = 0; j < sk; ++j) {
        const bool masked = (j >= limit) || (mr != nullptr && mr[j * mstride] != 0);
        const A val = masked ? neg_inf<A>() : static_cast<A>(to_float(xr[j])) * scale;
        bp[j] = val;
        m = val > m ? val : m;
      }
      if (std::isinf(m) && m < 0) {  // fully masked row: zeros
        const T zero = from_acc<T>(A(0));
        for (int64_t j = 0; j < sk; ++j) yr[j] = zero;
        continue;
      }
      A sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < sk; ++j) {
        const A e = fast_exp(bp[j] - m);
        bp[j] = e;
        sum += e;
      }
      const A inv = A(1) / sum;
#pragma omp simd
      for (int64_t j = 0; j < sk; ++j) yr[j] = from_acc<T>(bp[j] * inv);
    }
  }
}

template <typename T>
void backward_rows(const T* g, const T* p, T* gx, int64_t rows, int64_t sk, double scale_d, int num_threads) {
  using A = typename Acc<T>::type;
  const A scale = static_cast<A>(scale_d);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t row = 0; row < rows; ++row) {
    const T* gr = g + row * sk;
    const T* pr = p + row * sk;
    T* out = gx + row * sk;
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < sk; ++j) dot += static_cast<A>(to_float(gr[j])) * static_cast<A>(to_float(pr[j]));
#pragma omp simd
    for (int64_t j = 0; j < sk; ++j) {
      const A pj = static_cast<A>(to_float(pr[j]));
      out[j] = from_acc<T>(scale * pj * (static_cast<A>(to_float(gr[j])) - dot));
    }
  }
}

}  // namespace

void scaled_masked_softmax_forward_cpu(const void* x, DType dtype, void* y, int64_t b, int64_t h, int64_t sq,
                                       int64_t sk, double scale, const uint8_t* mask,
                                       const int64_t* mask_strides, int causal, int num_threads) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_rows(static_cast<const float*>(x), static_cast<float*>(y), b, h, sq, sk, scale, mask,
                          mask_strides, causal, num_threads);
    case DType::kFloat16:
      return forward_rows(static_cast<const fp16_t*>(x), static_cast<fp16_t*>(y), b, h, sq, sk, scale, mask,
                          mask_strides, causal, num_threads);
    case DType::kBFloat16:
      return forward_rows(static_cast<const bf16_t*>(x), static_cast<bf16_t*>(y), b, h, sq, sk, scale, mask,
                          mask_strides, causal, num_threads);
    case DType::kFloat64:
      return forward_rows(static_cast<const double*>(x), static_cast<double*>(y), b, h, sq, sk, scale, mask,
                          mask_strides, causal, num_threads);
  }
}

void scaled_masked_softmax_backward_cpu(const void* grad_y, const void* probs, DType dtype, void* grad_x,
                                        int64_t rows, int64_t sk, double scale, int num_threads) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_rows(static_cast<const float*>(grad_y), static_cast<const float*>(probs),
                           static_cast<float*>(grad_x), rows, sk, scale, num_threads);
    case DType::kFloat16:
      return backward_rows(static_cast<const fp16_t*>(grad_y), static_cast<const fp16_t*>(probs),
                           static_cast<fp16_t*>(grad_x), rows, sk, scale, num_threads);
    case DType::kBFloat16:
      return backward_rows(static_cast<const bf16_t*>(grad_y), static_cast<const bf16_t*>(probs),
                           static_cast<bf16_t*>(grad_x), rows, sk, scale, num_threads);
    case DType::kFloat64:
      return backward_rows(static_cast<const double*>(grad_y), static_cast<const double*>(probs),
                           static_cast<double*>(grad_x), rows, sk, scale, num_threads);
  }
}

}  // namespace mki
