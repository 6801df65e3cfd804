// Vectorised body of the fused BatchNorm + ReLU + global-average-pool on CPU (SPEC section 4).
// One task per channel range; x is (B, C, HW) contiguous, so a channel is B contiguous runs of HW.
//   forward:  out[b,c] = 1/HW sum_hw relu(xhat * w + bias),   xhat = (x - mean) * invstd
//   backward: dy = g[b,c]/HW [y > 0];  d bias = sum dy;  d w = sum dy xhat;
//             training: dx = w invstd (dy - d bias/N - xhat d w/N) (batch statistics depend on x), N = B*HW
//             eval:     dx = w invstd dy
// Neither the BN output nor the ReLU output is ever written to memory.
#pragma once
#include "cpu/kernels.h"
#include "cpu/vec_utils.h"

namespace hcd_fast::cpu::CPU_CAPABILITY {

template <typename T>
void channel_moments_kernel(const T* x, int64_t B, int64_t C, int64_t HW, T* mean, T* var, int64_t c0,
                            int64_t c1) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const T inv_n = T(1) / T(B * HW);
  for (int64_t c = c0; c < c1; ++c) {
    // Two passes (mean, then centred squares): stable for large means.
    T s = 0;
    for (int64_t b = 0; b < B; ++b) {
      const T* p = x + (b * C + c) * HW;
      V acc(T(0));
      int64_t k = 0;
      for (; k + L <= HW; k += L) acc = acc + V::loadu(p + k);
      T t = hsum(acc);
      for (; k < HW; ++k) t += p[k];
      s += t;
    }
    const T mu = s * inv_n;
    T q = 0;
    const V vmu(mu);
    for (int64_t b = 0; b < B; ++b) {
      const T* p = x + (b * C + c) * HW;
      V acc(T(0));
      int64_t k = 0;
      for (; k + L <= HW; k += L) {
        V d = V::loadu(p + k) - vmu;
        acc = at::vec::fmadd(d, d, acc);
      }
      T t = hsum(acc);
      for (; k < HW; ++k) t += (p[k] - mu) * (p[k] - mu);
      q += t;
    }
    mean[c] = mu;
    var[c] = q * inv_n;
  }
}

template <typename T>
void bn_relu_pool_fwd_kernel(const BnReluPoolArgs<T>& a, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const T inv_hw = T(1) / T(a.HW);
  for (int64_t c = c0; c < c1; ++c) {
    const T scale = a.weight[c] * a.invstd[c];
    const T shift = a.bias[c] - a.mean[c] * scale;
    const V vs(scale), vb(shift), zero(T(0));
    for (int64_t b = 0; b < a.B; ++b) {
      const T* p = a.x + (b * a.C + c) * a.HW;
      V acc(T(0));
      int64_t k = 0;
      for (; k + L <= a.HW; k += L) acc = acc + at::vec::maximum(at::vec::fmadd(V::loadu(p + k), vs, vb), zero);
      T t = hsum(acc);
      for (; k < a.HW; ++k) t += std::max(p[k] * scale + shift, T(0));
      a.out[b * a.C + c] = t * inv_hw;
    }
  }
}

template <typename T>
void bn_relu_pool_bwd_kernel(const BnReluPoolArgs<T>& a, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const T inv_hw = T(1) / T(a.HW), inv_n = T(1) / T(a.B * a.HW);
  for (int64_t c = c0; c < c1; ++c) {
    const T mu = a.mean[c], is = a.invstd[c], w = a.weight[c];
    const T scale = w * is, shift = a.bias[c] - mu * scale;
    const V vs(scale), vb(shift), vmu(mu), vis(is), zero(T(0));
    // Pass 1: d bias = sum dy, d w = sum dy xhat.
    T gb = 0, gw = 0;
    for (int64_t b = 0; b < a.B; ++b) {
      const T* p = a.x + (b * a.C + c) * a.HW;
      const T gbc = a.grad_out[b * a.C + c] * inv_hw;
      const V vg(gbc);
      V sdy(T(0)), sdx(T(0));
      int64_t k = 0;
      for (; k + L <= a.HW; k += L) {
        V xk = V::loadu(p + k);
        V dy = V::blendv(zero, vg, at::vec::fmadd(xk, vs, vb) > zero);
        sdy = sdy + dy;
        sdx = at::vec::fmadd(dy, (xk - vmu) * vis, sdx);
      }
      T tdy = hsum(sdy), tdx = hsum(sdx);
      for (; k < a.HW; ++k) {
        T dy = p[k] * scale + shift > T(0) ? gbc : T(0);
        tdy += dy;
        tdx += dy * (p[k] - mu) * is;
      }
      gb += tdy;
      gw += tdx;
    }
    a.grad_bias[c] = gb;
    a.grad_weight[c] = gw;
    // Pass 2: dx.
    const T mb = a.training ? gb * inv_n : T(0), mw = a.training ? gw * inv_n : T(0);
    const V vmb(mb), vmw(mw);
    for (int64_t b = 0; b < a.B; ++b) {
      const T* p = a.x + (b * a.C + c) * a.HW;
      T* q = a.grad_x + (b * a.C + c) * a.HW;
      const T gbc = a.grad_out[b * a.C + c] * inv_hw;
      const V vg(gbc);
      int64_t k = 0;
      for (; k + L <= a.HW; k += L) {
        V xk = V::loadu(p + k);
        V dy = V::blendv(zero, vg, at::vec::fmadd(xk, vs, vb) > zero);
        V dx = vs * (dy - vmb - (xk - vmu) * vis * vmw);
        dx.store(q + k);
      }
      for (; k < a.HW; ++k) {
        T dy = p[k] * scale + shift > T(0) ? gbc : T(0);
        q[k] = scale * (dy - mb - (p[k] - mu) * is * mw);
      }
    }
  }
}

}  // namespace hcd_fast::cpu::CPU_CAPABILITY
