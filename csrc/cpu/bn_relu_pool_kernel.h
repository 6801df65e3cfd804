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

// HW == 1 (the projectors' usual last map): x is a (B, C) matrix, so the kernels below vectorise across
// channels with b outermost. The caller hands them blocks of kHw1Block channels, so which channels take the
// vector path never depends on the thread count (results are identical for any number of threads).
template <typename T>
void channel_moments_hw1_kernel(const T* x, int64_t B, int64_t C, T* mean, T* var, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const T inv_n = T(1) / T(B);
  int64_t c = c0;
  for (; c + L <= c1; c += L) {
    V s(T(0));
    for (int64_t b = 0; b < B; ++b) s = s + V::loadu(x + b * C + c);
    const V mu = s * V(inv_n);
    V q(T(0));
    for (int64_t b = 0; b < B; ++b) {
      V d = V::loadu(x + b * C + c) - mu;
      q = at::vec::fmadd(d, d, q);
    }
    mu.store(mean + c);
    (q * V(inv_n)).store(var + c);
  }
  for (; c < c1; ++c) {
    T s = 0;
    for (int64_t b = 0; b < B; ++b) s += x[b * C + c];
    const T mu = s * inv_n;
    T q = 0;
    for (int64_t b = 0; b < B; ++b) q += (x[b * C + c] - mu) * (x[b * C + c] - mu);
    mean[c] = mu;
    var[c] = q * inv_n;
  }
}

template <typename T>
void bn_relu_pool_fwd_hw1_kernel(const BnReluPoolArgs<T>& a, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t C = a.C;
  int64_t c = c0;
  for (; c + L <= c1; c += L) {
    const V scale = V::loadu(a.weight + c) * V::loadu(a.invstd + c);
    const V shift = V::loadu(a.bias + c) - V::loadu(a.mean + c) * scale;
    for (int64_t b = 0; b < a.B; ++b)
      at::vec::maximum(at::vec::fmadd(V::loadu(a.x + b * C + c), scale, shift), V(T(0))).store(a.out + b * C + c);
  }
  for (; c < c1; ++c) {
    const T scale = a.weight[c] * a.invstd[c], shift = a.bias[c] - a.mean[c] * scale;
    for (int64_t b = 0; b < a.B; ++b) a.out[b * C + c] = std::max(a.x[b * C + c] * scale + shift, T(0));
  }
}

template <typename T>
void bn_relu_pool_bwd_hw1_kernel(const BnReluPoolArgs<T>& a, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t C = a.C;
  const T inv_n = T(1) / T(a.B);
  int64_t c = c0;
  for (; c + L <= c1; c += L) {
    const V mu = V::loadu(a.mean + c), is = V::loadu(a.invstd + c);
    const V scale = V::loadu(a.weight + c) * is, shift = V::loadu(a.bias + c) - mu * scale, zero(T(0));
    V gb(T(0)), gw(T(0));
    for (int64_t b = 0; b < a.B; ++b) {
      const V xk = V::loadu(a.x + b * C + c);
      const V dy = V::blendv(zero, V::loadu(a.grad_out + b * C + c), at::vec::fmadd(xk, scale, shift) > zero);
      gb = gb + dy;
      gw = at::vec::fmadd(dy, (xk - mu) * is, gw);
    }
    gb.store(a.grad_bias + c);
    gw.store(a.grad_weight + c);
    const V mb = a.training ? gb * V(inv_n) : zero, mw = a.training ? gw * V(inv_n) : zero;
    for (int64_t b = 0; b < a.B; ++b) {
      const V xk = V::loadu(a.x + b * C + c);
      const V dy = V::blendv(zero, V::loadu(a.grad_out + b * C + c), at::vec::fmadd(xk, scale, shift) > zero);
      (scale * (dy - mb - (xk - mu) * is * mw)).store(a.grad_x + b * C + c);
    }
  }
  for (; c < c1; ++c) {
    const T mu = a.mean[c], is = a.invstd[c], scale = a.weight[c] * is, shift = a.bias[c] - mu * scale;
    T gb = 0, gw = 0;
    for (int64_t b = 0; b < a.B; ++b) {
      const T xk = a.x[b * C + c];
      const T dy = xk * scale + shift > T(0) ? a.grad_out[b * C + c] : T(0);
      gb += dy;
      gw += dy * (xk - mu) * is;
    }
    a.grad_bias[c] = gb;
    a.grad_weight[c] = gw;
    const T mb = a.training ? gb * inv_n : T(0), mw = a.training ? gw * inv_n : T(0);
    for (int64_t b = 0; b < a.B; ++b) {
      const T xk = a.x[b * C + c];
      const T dy = xk * scale + shift > T(0) ? a.grad_out[b * C + c] : T(0);
      a.grad_x[b * C + c] = scale * (dy - mb - (xk - mu) * is * mw);
    }
  }
}

}  // namespace hcd_fast::cpu::CPU_CAPABILITY
