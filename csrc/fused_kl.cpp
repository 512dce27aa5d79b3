// CPU implementation of the fused KL statistics / gradient (see fused_kl.h for the contract).
//
// Forward reads each row once, in chunks small enough for L1: the chunk's maximum is taken first and the
// running sums are rescaled only when it grows (online max rescaling), so the cost is ~1 exp per element
// per tensor and no [n, v] temporary exists. Chunk sums run in the accumulation type with SIMD lanes and
// are folded into double running totals.
#include "fused_kl.h"

#include <algorithm>
#include <cmath>

namespace mki {
namespace {

constexpr int64_t kChunk = 512;

template <typename T>
void stats_rows(const T* s, const T* t, int64_t n, int64_t v, int64_t ld_s, int64_t ld_t, double temperature,
                typename Acc<T>::type* stats, int num_threads) {
  using A = typename Acc<T>::type;
  const A inv_tau = static_cast<A>(1.0 / temperature);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t row = 0; row < n; ++row) {
    alignas(64) A bs[kChunk];
    alignas(64) A bt[kChunk];
    const T* sr = s + row * ld_s;
    const T* tr = t + row * ld_t;
    double zs_tot = 0, zt_tot = 0, a_tot = 0, b_tot = 0, c_tot = 0;
    A ms = neg_inf<A>(), mt = neg_inf<A>();
    for (int64_t c0 = 0; c0 < v; c0 += kChunk) {
      const int64_t len = std::min(kChunk, v - c0);
      A cms = neg_inf<A>(), cmt = neg_inf<A>();
#pragma omp simd reduction(max : cms, cmt)
      for (int64_t j = 0; j < len; ++j) {
        const A xs = static_cast<A>(to_float(sr[c0 + j])) * inv_tau;
        const A xt = static_cast<A>(to_float(tr[c0 + j])) * inv_tau;
        bs[j] = xs;
        bt[j] = xt;
        cms = xs > cms ? xs : cms;
        cmt = xt > cmt ? xt : cmt;
      }
      if (cms > ms) {  // rescale the student's sums to the new maximum (they are 0 while ms is -inf)
        const double sc = zs_tot > 0 ? std::exp(static_cast<double>(ms) - cms) : 0.0;
        zs_tot *= sc;
        b_tot *= sc;
        ms = cms;
      }
      if (cmt > mt) {  // C depends on m_t itself: C' = e^(m - m')(C + (m - m') Z)
        if (zt_tot > 0) {
          const double delta = static_cast<double>(mt) - cmt;
          const double sc = std::exp(delta);
          c_tot = sc * (c_tot + delta * zt_tot);
          zt_tot *= sc;
          a_tot *= sc;
        } else {
          c_tot = zt_tot = a_tot = 0;
        }
        mt = cmt;
      }
      // While a maximum is still -inf every entry so far is -inf: shifting by 0 makes their exp exactly 0.
      const A ms0 = std::isinf(ms) ? A(0) : ms;
      const A mt0 = std::isinf(mt) ? A(0) : mt;
      A zs = 0, zt = 0, a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : zs, zt, a, b, c)
      for (int64_t j = 0; j < len; ++j) {
        const A es = fast_exp(bs[j] - ms0);
        const A et = fast_exp(bt[j] - mt0);
        const A d = bt[j] - bs[j];
        zs += es;
        zt += et;
        a += et > 0 ? et * d : A(0);  // p = 0 entries contribute 0 even where d is infinite
        b -= es > 0 ? es * d : A(0);
        c += et > 0 ? et * (bt[j] - mt0) : A(0);
      }
      zs_tot += zs;
      zt_tot += zt;
      a_tot += a;
      b_tot += b;
      c_tot += c;
    }
    A* out = stats + row * 7;
    out[0] = ms;
    out[1] = static_cast<A>(zs_tot);
    out[2] = mt;
    out[3] = static_cast<A>(zt_tot);
    out[4] = static_cast<A>(a_tot);
    out[5] = static_cast<A>(b_tot);
    out[6] = static_cast<A>(c_tot);
  }
}

template <typename T>
void backward_rows(const T* s, const T* t, int64_t n, int64_t v, int64_t ld_s, int64_t ld_t, double temperature,
                   const typename Acc<T>::type* lse_s, const typename Acc<T>::type* lse_t,
                   const typename Acc<T>::type* row_value, const typename Acc<T>::type* grad_rows, int mode,
                   T* grad, int num_threads) {
  using A = typename Acc<T>::type;
  const A inv_tau = static_cast<A>(1.0 / temperature);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t row = 0; row < n; ++row) {
    const T* sr = s + row * ld_s;
    const T* tr = t + row * ld_t;
    T* out = grad + row * v;
    const A g = grad_rows[row];
    if (g == A(0)) {
      const T zero = from_acc<T>(A(0));
      for (int64_t j = 0; j < v; ++j) out[j] = zero;
      continue;
    }
    const A ls = lse_s[row], lt = lse_t[row];
    // lse = -inf only when the whole row is -inf: shift by 0 so every p is exactly 0.
    const A ls0 = std::isinf(ls) ? A(0) : ls;
    const A lt0 = std::isinf(lt) ? A(0) : lt;
    const A scale = g * inv_tau;
    const A offset = lt - ls - row_value[row];
    alignas(64) A bs[kChunk];
    alignas(64) A bt[kChunk];
    for (int64_t c0 = 0; c0 < v; c0 += kChunk) {
      const int64_t len = std::min(kChunk, v - c0);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        bs[j] = static_cast<A>(to_float(sr[c0 + j])) * inv_tau;
        bt[j] = static_cast<A>(to_float(tr[c0 + j])) * inv_tau;
      }
      if (mode == kKlForward) {
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) bs[j] = scale * (fast_exp(bs[j] - ls0) - fast_exp(bt[j] - lt0));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const A ps = fast_exp(bs[j] - ls0);
          bs[j] = ps > 0 ? scale * ps * (bs[j] - bt[j] + offset) : A(0);
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) out[c0 + j] = from_acc<T>(bs[j]);
    }
  }
}

template <typename T>
void stats_dispatch(const void* s, const void* t, int64_t n, int64_t v, int64_t ld_s, int64_t ld_t,
                    double temperature, void* stats, int num_threads) {
  using A = typename Acc<T>::type;
  stats_rows<T>(static_cast<const T*>(s), static_cast<const T*>(t), n, v, ld_s, ld_t, temperature,
                static_cast<A*>(stats), num_threads);
}

template <typename T>
void backward_dispatch(const void* s, const void* t, int64_t n, int64_t v, int64_t ld_s, int64_t ld_t,
                       double temperature, const void* lse_s, const void* lse_t, const void* row_value,
                       const void* grad_rows, int mode, void* grad, int num_threads) {
  using A = typename Acc<T>::type;
  backward_rows<T>(static_cast<const T*>(s), static_cast<const T*>(t), n, v, ld_s, ld_t, temperature,
                   static_cast<const A*>(lse_s), static_cast<const A*>(lse_t), static_cast<const A*>(row_value),
                   static_cast<const A*>(grad_rows), mode, static_cast<T*>(grad), num_threads);
}

}  // namespace

void kl_forward_stats_cpu(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                          int64_t ld_t, double temperature, void* stats, int num_threads) {
  switch (dtype) {
    case DType::kFloat32:
      return stats_dispatch<float>(s, t, n, v, ld_s, ld_t, temperature, stats, num_threads);
    case DType::kFloat16:
      return stats_dispatch<fp16_t>(s, t, n, v, ld_s, ld_t, temperature, stats, num_threads);
    case DType::kBFloat16:
      return stats_dispatch<bf16_t>(s, t, n, v, ld_s, ld_t, temperature, stats, num_threads);
    case DType::kFloat64:
      return stats_dispatch<double>(s, t, n, v, ld_s, ld_t, temperature, stats, num_threads);
  }
}

void kl_backward_cpu(const void* s, const void* t, DType dtype, int64_t n, int64_t v, int64_t ld_s,
                     int64_t ld_t, double temperature, const void* lse_s, const void* lse_t,
                     const void* row_value, const void* grad_rows, int mode, void* grad, int num_threads) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_dispatch<float>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value, grad_rows,
                                      mode, grad, num_threads);
    case DType::kFloat16:
      return backward_dispatch<fp16_t>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value,
                                       grad_rows, mode, grad, num_threads);
    case DType::kBFloat16:
      return backward_dispatch<bf16_t>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value,
                                       grad_rows, mode, grad, num_threads);
    case DType::kFloat64:
      return backward_dispatch<double>(s, t, n, v, ld_s, ld_t, temperature, lse_s, lse_t, row_value,
                                       grad_rows, mode, grad, num_threads);
  }
}

}  // namespace mki
