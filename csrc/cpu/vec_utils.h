// Vectorised row primitives shared by the CPU kernel bodies. Included only by kernels_default.cpp and
// kernels_avx2.cpp, after CPU_CAPABILITY is defined, so at::vec::Vectorized picks that ISA.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace hcd_fast::cpu::CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp: the polynomial exp_u20 for float (no libm call, ~1 ulp in the range used here), Sleef for double.
inline Vec<float> vexp(const Vec<float>& v) { return v.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& v) { return v.exp(); }

// Horizontal reductions in a fixed lane order (deterministic).
template <typename T>
inline T hsum(const Vec<T>& v) {
  alignas(64) T buf[Vec<T>::size()];
  v.store(buf);
  T s = 0;
  for (int i = 0; i < Vec<T>::size(); ++i) s += buf[i];
  return s;
}

template <typename T>
inline T hmax(const Vec<T>& v) {
  alignas(64) T buf[Vec<T>::size()];
  v.store(buf);
  T m = buf[0];
  for (int i = 1; i < Vec<T>::size(); ++i) m = std::max(m, buf[i]);
  return m;
}

// max_k x_k and sum_k x_k in one pass.
template <typename T>
inline void row_max_sum(const T* x, int64_t K, T& mx, T& sum) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  T m = -std::numeric_limits<T>::infinity(), s = 0;
  if (K >= L) {
    Vec<T> vm = Vec<T>::loadu(x), vs = vm;
    for (k = L; k + L <= K; k += L) {
      Vec<T> v = Vec<T>::loadu(x + k);
      vm = at::vec::maximum(vm, v);
      vs = vs + v;
    }
    m = hmax(vm);
    s = hsum(vs);
  }
  for (; k < K; ++k) {
    m = std::max(m, x[k]);
    s += x[k];
  }
  mx = m;
  sum = s;
}

template <typename T>
inline T row_max(const T* x, int64_t K) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  T m = -std::numeric_limits<T>::infinity();
  if (K >= L) {
    Vec<T> vm = Vec<T>::loadu(x);
    for (k = L; k + L <= K; k += L) vm = at::vec::maximum(vm, Vec<T>::loadu(x + k));
    m = hmax(vm);
  }
  for (; k < K; ++k) m = std::max(m, x[k]);
  return m;
}

template <typename T>
inline T row_dot(const T* a, const T* b, int64_t K) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  Vec<T> acc(T(0));
  for (; k + L <= K; k += L) acc = at::vec::fmadd(Vec<T>::loadu(a + k), Vec<T>::loadu(b + k), acc);
  T s = hsum(acc);
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

}  // namespace hcd_fast::cpu::CPU_CAPABILITY
