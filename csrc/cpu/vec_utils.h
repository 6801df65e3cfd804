// Vectorised row primitives shared by the CPU kernel bodies. Included only by kernels_default.cpp and
// kernels_avx2.cpp, after CPU_CAPABILITY is defined, so at::vec::Vectorized picks that ISA.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/kernels.h"

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

// Rows stored in another dtype than the compute type T: converted element-wise through a buffer, vectorised
// for bf16/fp16 -> float (convert_to_float) and float -> bf16/fp16 (convert_from_float, round to nearest even,
// as Tensor.to does).
template <typename R, typename T>
inline void convert_row_in(const R* src, T* dst, int64_t K) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<R, c10::BFloat16> || std::is_same_v<R, c10::Half>)) {
    using VR = at::vec::Vectorized<R>;
    constexpr int64_t L = VR::size(), LF = Vec<float>::size();
    static_assert(L == 2 * LF, "a reduced-precision vector converts to two float vectors");
    for (; k + L <= K; k += L) {
      auto lohi = at::vec::convert_to_float<R>(VR::loadu(src + k));
      std::get<0>(lohi).store(dst + k);
      std::get<1>(lohi).store(dst + k + LF);
    }
  }
  if constexpr (std::is_same_v<R, c10::BFloat16> || std::is_same_v<R, c10::Half>) {
    for (; k < K; ++k) dst[k] = T(float(src[k]));
  } else {
    for (; k < K; ++k) dst[k] = T(src[k]);
  }
}

template <typename R, typename T>
inline void convert_row_out(const T* src, R* dst, int64_t K) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<R, c10::BFloat16> || std::is_same_v<R, c10::Half>)) {
    using VR = at::vec::Vectorized<R>;
    constexpr int64_t L = VR::size(), LF = Vec<float>::size();
    for (; k + L <= K; k += L)
      at::vec::convert_from_float<R>(Vec<float>::loadu(src + k), Vec<float>::loadu(src + k + LF)).store(dst + k);
  }
  if constexpr (std::is_same_v<R, c10::BFloat16> || std::is_same_v<R, c10::Half>) {
    for (; k < K; ++k) dst[k] = R(float(src[k]));  // a double is rounded to float first (one rounding at fp32)
  } else {
    for (; k < K; ++k) dst[k] = R(src[k]);
  }
}

// K values of T at element `offset` of `base` (stored as dt): the storage itself when dt is T, else `buf`
// filled with the converted values.
template <typename T>
inline const T* load_row(const void* base, Dtype dt, int64_t offset, int64_t K, T* buf) {
  switch (dt) {
    case Dtype::Float:
      if constexpr (std::is_same_v<T, float>) return static_cast<const float*>(base) + offset;
      convert_row_in(static_cast<const float*>(base) + offset, buf, K);
      return buf;
    case Dtype::Double:
      if constexpr (std::is_same_v<T, double>) return static_cast<const double*>(base) + offset;
      convert_row_in(static_cast<const double*>(base) + offset, buf, K);
      return buf;
    case Dtype::BFloat16:
      convert_row_in(static_cast<const c10::BFloat16*>(base) + offset, buf, K);
      return buf;
    case Dtype::Half:
      convert_row_in(static_cast<const c10::Half*>(base) + offset, buf, K);
      return buf;
  }
  return buf;
}

// Where a kernel writes K values of T that go to element `offset` of `base` (stored as dt): the storage
// itself when dt is T, else `buf`; store_row then converts buf into the storage (a no-op for the former).
template <typename T>
inline T* out_row(void* base, Dtype dt, int64_t offset, T* buf) {
  if constexpr (std::is_same_v<T, float>)
    if (dt == Dtype::Float) return static_cast<float*>(base) + offset;
  if constexpr (std::is_same_v<T, double>)
    if (dt == Dtype::Double) return static_cast<double*>(base) + offset;
  return buf;
}

template <typename T>
inline void store_row(void* base, Dtype dt, int64_t offset, const T* row, int64_t K) {
  switch (dt) {
    case Dtype::Float:
      if (static_cast<const void*>(row) != static_cast<float*>(base) + offset)
        convert_row_out(row, static_cast<float*>(base) + offset, K);
      return;
    case Dtype::Double:
      if (static_cast<const void*>(row) != static_cast<double*>(base) + offset)
        convert_row_out(row, static_cast<double*>(base) + offset, K);
      return;
    case Dtype::BFloat16:
      convert_row_out(row, static_cast<c10::BFloat16*>(base) + offset, K);
      return;
    case Dtype::Half:
      convert_row_out(row, static_cast<c10::Half*>(base) + offset, K);
      return;
  }
}

}  // namespace hcd_fast::cpu::CPU_CAPABILITY
