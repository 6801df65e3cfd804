// Vectorised body of the fused HCD sub-logit loss on CPU (SPEC section 2, items 4-6 and the total).
// One task per sample b: the student row's log-softmax is computed once and reused by the S*n sub-logit
// KL rows of that sample, and the student gradient row is owned by that task (no atomics, deterministic).
// Gradients are computed in the same row passes as the loss: the loss is the last node of the graph, so
// backward only scales them by grad_output.
//
// Per row x (one sub-logit, K classes), with q = softmax(z_s/T), p = softmax(x/T), s1 = softmax(x):
//   CE_ls(x, y)          = lse(x) - (1-ls) x_y - ls/K sum_k x_k,    d/dx = s1 - (1-ls) e_y - ls/K
//   T^2 KL(p || q)       = T^2 sum_k p_k (log p_k - log q_k),      d/dx = T p (log p - log q - KL)
//                                                                    d/dz_s = T (q - p)
// Log-probabilities are formed as (x - max) / T - log Z, never x / T - (max / T + log Z): at logit scales
// in the hundreds the latter loses the low bits of log p, and the gradients with them.
// Orthogonality per (stage, sample): v_i = x_i - shift z_t (shift = 0 unless ortho_on="raw") masked at y, den_i = max(|v_i|, eps), G = D / (den den^T)
// with D_ij = v_i . v_j, hinge h_ij = relu(G_ij - theta), d/dv_i = sum_j c_ij v_j where
//   c_ij = 2 g_ij / (den_i den_j) (i != j),  c_ii = -2 sum_j g_ij G_ij / den_i^2 (0 if |v_i| < eps),
//   g_ij = w_ol * 2 h_ij / (B n (n-1)).
#pragma once
#include <memory>

#include "cpu/kernels.h"
#include "cpu/vec_utils.h"

namespace hcd_fast::cpu::CPU_CAPABILITY {

template <typename T>
void sub_logit_loss_kernel(const SubLogitLossArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t S = a.S, B = a.B, n = a.n, K = a.K;
  const bool grad = a.grad_sub_logits != nullptr;
  const T Tt = T(a.temperature), invT = T(1) / Tt, T2 = Tt * Tt;
  const bool unit_T = a.temperature == 1.0;
  const T ls = T(a.label_smoothing), ls_K = ls / T(K);
  // Gradient scales: every row term is a mean over B (student) or B*n (sub-logit rows).
  const T a_ce = T(a.w_gt / B), a_kd = T(a.w_kd * a.temperature / B);
  const T a_sce = T(a.w_gt / (B * n)), a_skl = T(a.w_kl * a.temperature / (B * n));
  const T ol_norm = n > 1 ? T(1.0 / (B * n * (n - 1))) : T(0);
  const T fill = T(a.mask_fill);
  const bool masked = a.mask_target;
  const T shift = T(a.ortho_shift);
  const bool shifted = a.ortho_shift != 0.0 && n > 1;

  std::unique_ptr<T[]> logq_buf(new T[K]);  // log softmax(z_s/T) of the current sample
  T* lq = logq_buf.get();
  std::unique_ptr<T[]> small(new T[6 * n + 3 * n * n]);
  T *m = small.get(), *sumx = m + n, *Z1 = sumx + n, *ZT = Z1 + n, *klraw = ZT + n, *den = klraw + n;
  T *D = den + n, *G = D + n * n, *C = G + n * n;
  // ortho_on="raw": the orthogonality rows u_i = x_i - shift z_t of the current (stage, sample).
  std::unique_ptr<T[]> ubuf(shifted ? new T[n * K] : nullptr);

  for (int64_t b = begin; b < end; ++b) {
    const T* xs = a.student_logits + b * K;
    const T* xt = a.teacher_logits + b * K;
    const int64_t y = a.target[b];
    T* gzs = grad ? a.grad_student_logits + b * K : nullptr;

    // Student row: max, sum, lse at T=1 and at T, log q.
    T ms, sum_s;
    row_max_sum(xs, K, ms, sum_s);
    T z1s = 0, zts = 0;
    {
      V v1(T(0)), vT(T(0));
      const V vm(ms), vinvT(invT);
      int64_t k = 0;
      for (; k + L <= K; k += L) {
        V d = V::loadu(xs + k) - vm;
        v1 = v1 + vexp(d);
        if (!unit_T) vT = vT + vexp(d * vinvT);
      }
      z1s = hsum(v1);
      zts = hsum(vT);
      for (; k < K; ++k) {
        z1s += std::exp(xs[k] - ms);
        if (!unit_T) zts += std::exp((xs[k] - ms) * invT);
      }
      if (unit_T) zts = z1s;
    }
    const T lse1s = ms + std::log(z1s), logzts = std::log(zts);
    {
      const V vinvT(invT), vm(ms), vlogz(logzts);
      int64_t k = 0;
      for (; k + L <= K; k += L) ((V::loadu(xs + k) - vm) * vinvT - vlogz).store(lq + k);
      for (; k < K; ++k) lq[k] = (xs[k] - ms) * invT - logzts;
    }
    // Teacher row: KD = T^2 (sum_k pt_k ((xt_k - mt)/T - log q_k) / Zt - log Zt).
    const T mt = row_max(xt, K);
    T ztt = 0, kd_acc = 0;
    {
      V vz(T(0)), vacc(T(0));
      const V vm(mt), vinvT(invT);
      int64_t k = 0;
      for (; k + L <= K; k += L) {
        V xk = V::loadu(xt + k);
        V d = (xk - vm) * vinvT;
        V e = vexp(d);
        vz = vz + e;
        vacc = at::vec::fmadd(e, d - V::loadu(lq + k), vacc);
      }
      ztt = hsum(vz);
      kd_acc = hsum(vacc);
      for (; k < K; ++k) {
        T d = (xt[k] - mt) * invT;
        T e = std::exp(d);
        ztt += e;
        kd_acc += e * (d - lq[k]);
      }
    }
    const T logztt = std::log(ztt);
    const T kd_b = T2 * (kd_acc / ztt - logztt);
    const T ce_b = lse1s - (T(1) - ls) * xs[y] - ls_K * sum_s;

    // Student gradient, CE + KD + the q part of every sub-logit KL row (sum over S*n rows of T(q - p)):
    //   a_ce (s1 - ls/K) + a_kd (q - pt) + S n a_skl q ; the -(1-ls) at y and the -a_skl p of each row
    //   are added below.
    if (grad) {
      const T cq = a_kd + T(S * n) * a_skl;
      const V vms(ms), vinvz1(T(1) / z1s), vace(a_ce), vlsK(a_ce * ls_K), vcq(cq), vakd(a_kd), vinvT(invT),
          vmt(mt), vlogztt(logztt);
      int64_t k = 0;
      for (; k + L <= K; k += L) {
        V s1 = vexp(V::loadu(xs + k) - vms) * vinvz1;
        V q = vexp(V::loadu(lq + k));
        V pt = vexp((V::loadu(xt + k) - vmt) * vinvT - vlogztt);
        V g = at::vec::fmadd(vace, s1, at::vec::fmadd(vcq, q, -(vlsK + vakd * pt)));
        g.store(gzs + k);
      }
      for (; k < K; ++k) {
        T s1 = std::exp(xs[k] - ms) / z1s;
        T q = std::exp(lq[k]);
        T pt = std::exp((xt[k] - mt) * invT - logztt);
        gzs[k] = a_ce * s1 + cq * q - a_ce * ls_K - a_kd * pt;
      }
      gzs[y] -= a_ce * (T(1) - ls);
    }

    T sub_ce_b = 0, sub_kl_b = 0, ol_b = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t row0 = (s * B + b) * n;
      const T* x0 = a.sub_logits + row0 * K;
      T* g0 = grad ? a.grad_sub_logits + row0 * K : nullptr;

      // Pass A: max and sum of each row; Gram matrix of the (masked) orthogonality rows u.
      for (int64_t i = 0; i < n; ++i) row_max_sum(x0 + i * K, K, m[i], sumx[i]);
      const T* u0 = x0;
      if (shifted) {
        for (int64_t r = 0; r < n; ++r)
          for (int64_t k = 0; k < K; ++k) ubuf[r * K + k] = x0[r * K + k] - shift * xt[k];
        u0 = ubuf.get();
      }
      if (n > 1) {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = i; j < n; ++j) {
            T d = row_dot(u0 + i * K, u0 + j * K, K);
            // Masking replaces u_y by the fill value in both rows.
            if (masked) d += fill * fill - u0[i * K + y] * u0[j * K + y];
            D[i * n + j] = D[j * n + i] = d;
          }
      }

      // Pass B: softmax normalisers and the KL against the student, per row. exp(x - max) is parked in the
      // gradient row for pass C.
      for (int64_t i = 0; i < n; ++i) {
        const T* x = x0 + i * K;
        T* g = grad ? g0 + i * K : nullptr;
        const V vm(m[i]), vinvT(invT);
        V vz1(T(0)), vzT(T(0)), vkl(T(0));
        int64_t k = 0;
        for (; k + L <= K; k += L) {
          V xk = V::loadu(x + k);
          V e1 = vexp(xk - vm);
          vz1 = vz1 + e1;
          if (g) e1.store(g + k);
          if (unit_T) {
            vkl = at::vec::fmadd(e1, xk - vm - V::loadu(lq + k), vkl);
          } else {
            V dT = (xk - vm) * vinvT;
            V eT = vexp(dT);
            vzT = vzT + eT;
            vkl = at::vec::fmadd(eT, dT - V::loadu(lq + k), vkl);
          }
        }
        T z1 = hsum(vz1), zT = hsum(vzT), kl = hsum(vkl);
        for (; k < K; ++k) {
          T e1 = std::exp(x[k] - m[i]);
          z1 += e1;
          if (g) g[k] = e1;
          if (unit_T) {
            kl += e1 * (x[k] - m[i] - lq[k]);
          } else {
            T dT = (x[k] - m[i]) * invT;
            T eT = std::exp(dT);
            zT += eT;
            kl += eT * (dT - lq[k]);
          }
        }
        if (unit_T) zT = z1;
        Z1[i] = z1;
        ZT[i] = zT;
        const T lse1 = m[i] + std::log(z1);
        klraw[i] = kl / zT - std::log(zT);  // KL(p || q) at temperature T, without the T^2
        sub_ce_b += lse1 - (T(1) - ls) * x[y] - ls_K * sumx[i];
        sub_kl_b += T2 * klraw[i];
      }

      // Orthogonality: hinge on the normalised Gram matrix, and its gradient coefficients C (n x n).
      if (n > 1) {
        for (int64_t i = 0; i < n; ++i) den[i] = std::max(std::sqrt(D[i * n + i]), T(a.ortho_eps));
        for (int64_t i = 0; i < n; ++i) {
          T diag = 0;
          for (int64_t j = 0; j < n; ++j) {
            G[i * n + j] = D[i * n + j] / (den[i] * den[j]);
            if (j == i) continue;
            const T h = std::max(G[i * n + j] - T(a.ortho_threshold), T(0));
            ol_b += h * h;
            const T gij = T(a.w_ol) * T(2) * h * ol_norm;
            C[i * n + j] = T(2) * gij / (den[i] * den[j]);
            diag += gij * G[i * n + j];
          }
          const bool clamped = std::sqrt(D[i * n + i]) < T(a.ortho_eps);
          C[i * n + i] = clamped ? T(0) : T(-2) * diag / (den[i] * den[i]);
        }
      }

      // Pass C: gradient of each row, and the -a_skl p part of the student gradient.
      if (!grad) continue;
      const bool ortho = n > 1 && a.w_ol != 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const T* x = x0 + i * K;
        T* g = g0 + i * K;
        const T logzT = std::log(ZT[i]);
        const T inv_z1 = T(1) / Z1[i], inv_zT = T(1) / ZT[i];
        const T a_x = a.detach_sub_targets ? T(0) : a_skl;
        const V vinvz1(inv_z1), vinvzT(inv_zT), vm(m[i]), vinvT(invT), vlogzT(logzT), vasce(a_sce),
            vneg_ls(-a_sce * ls_K), vkl(klraw[i]), vax(a_x), vaskl(a_skl);
        int64_t k = 0;
        for (; k + L <= K; k += L) {
          V xk = V::loadu(x + k);
          V s1 = V::loadu(g + k) * vinvz1;  // exp(x - m) parked by pass B
          V p = unit_T ? s1 : vexp((xk - vm) * vinvT) * vinvzT;
          V t = (xk - vm) * vinvT - vlogzT - V::loadu(lq + k) - vkl;  // log p - log q - KL
          // a_sce (s1 - ls/K) + a_x p (log p - log q - KL)
          V gk = at::vec::fmadd(vasce, s1, at::vec::fmadd(vax * p, t, vneg_ls));
          if (ortho)
            for (int64_t j = 0; j < n; ++j) gk = at::vec::fmadd(V(C[i * n + j]), V::loadu(u0 + j * K + k), gk);
          gk.store(g + k);
          V gz = V::loadu(gzs + k) - vaskl * p;
          gz.store(gzs + k);
        }
        for (; k < K; ++k) {
          T s1 = g[k] * inv_z1;
          T p = unit_T ? s1 : std::exp((x[k] - m[i]) * invT) * inv_zT;
          T gk = a_sce * (s1 - ls_K) + a_x * p * ((x[k] - m[i]) * invT - logzT - lq[k] - klraw[i]);
          if (ortho)
            for (int64_t j = 0; j < n; ++j) gk += C[i * n + j] * u0[j * K + k];
          g[k] = gk;
          gzs[k] -= a_skl * p;
        }
        g[y] -= a_sce * (T(1) - ls);
        // The masked entry does not reach the orthogonality term.
        if (ortho && masked)
          for (int64_t j = 0; j < n; ++j) g[y] -= C[i * n + j] * u0[j * K + y];
      }
    }
    T* part = a.partials + b * 5;
    part[0] = ce_b;
    part[1] = sub_ce_b;
    part[2] = kd_b;
    part[3] = sub_kl_b;
    part[4] = ol_b;
  }
}

}  // namespace hcd_fast::cpu::CPU_CAPABILITY
