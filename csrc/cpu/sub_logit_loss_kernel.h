// Vectorised bodies of the fused HCD sub-logit loss on CPU (SPEC section 2, items 4-6; the issue-11 design,
// hcd_fast/ops/sub_logit_loss.py). The forward writes the loss terms and small statistics only; the backward
// recomputes every softmax from the inputs and writes each gradient element once, in its input's dtype.
//
// Notation: x a sub-logit row zf_i (K classes), z_s / z_t the student / teacher rows, p = softmax(x),
// P = softmax(x / T), P_s = softmax(z_s / T), p_s = softmax(z_s), P_t = softmax(z_t / T), y the target.
//   CE_ls(x, y)       = lse(x) - (1-ls) x_y - ls/K sum_k x_k,      d/dx = p - (1-ls) e_y - ls/K
//   T^2 KL(P || P_s)  = T^2 sum_k P_k (log P_k - log P_s,k),     d/dx = T P (log P - log P_s - KL)
//                                                                  d/dz_s = T (P_s - P)
//   orthogonality per (stage, sample): d(w_ol OL)/d v_i = sum_j M_ij v_j (M = ortho_coef, below).
// Log-probabilities are formed as (x - max) / T - log Z, never x / T - lse: at logit magnitudes in the
// hundreds the latter loses the low bits of log P, and the gradients with them. For that reason the CPU
// backward recomputes each row's max and normaliser (the same exps it needs for P anyway) instead of
// reading the lse columns of row_stats / sample_stats; it reads the kl column and ortho_coef.
//
// Work split (every output slot has one writer: deterministic for any thread count):
//   forward phase 1, per sample b:        sample_stats, sample_aux, ce and kd of b;
//   forward phase 2, per (stage s, b):    the n rows' row_stats, ortho_coef, and their sub-CE, KL, hinge sums;
//   backward, per sample b:               dz_s[b] and dzf[s, b, i] for every s, i (dz_s sums the S*n rows).
// Bytes (the memory traffic; rows of a task live in L1/L2): forward reads zf, z_s, z_t once; backward reads
// zf, z_s, z_t once and writes dzf, dz_s once in the inputs' dtypes; the statistics are O(S B n^2).
// A sample whose target is outside [0, K) gets NaN statistics, partials and gradient rows (never a read at y).
#pragma once
#include <memory>

#include "cpu/kernels.h"
#include "cpu/vec_utils.h"

namespace hcd_fast::cpu::CPU_CAPABILITY {

namespace sub_logit_loss_math {

template <typename T>
inline T nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// sum_k exp((x_k - m) * c) for c = 1 (c1) and c = invT (cT); cT's sum equals c1's when unit_T.
template <typename T>
inline void exp_sums(const T* x, int64_t K, T m, T invT, bool unit_T, T& z1, T& zT) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  V v1(T(0)), vT(T(0));
  const V vm(m), vinvT(invT);
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V d = V::loadu(x + k) - vm;
    v1 = v1 + vexp(d);
    if (!unit_T) vT = vT + vexp(d * vinvT);
  }
  T s1 = hsum(v1), sT = hsum(vT);
  for (; k < K; ++k) {
    s1 += std::exp(x[k] - m);
    if (!unit_T) sT += std::exp((x[k] - m) * invT);
  }
  z1 = s1;
  zT = unit_T ? s1 : sT;
}

// sum_k exp(dx_k) and sum_k exp(dx_k) (dx_k - ds_k) with dx_k = (x_k - mx) / T, ds_k = (zs_k - ms) / T:
// the normaliser of P = softmax(x / T) and the unnormalised sum of KL(P || P_s) (up to the log Z terms).
template <typename T>
inline void kl_sums(const T* x, const T* zs, int64_t K, T mx, T ms, T invT, T& zT, T& acc) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  V vz(T(0)), va(T(0));
  const V vmx(mx), vms(ms), vinvT(invT);
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V dx = (V::loadu(x + k) - vmx) * vinvT;
    V e = vexp(dx);
    vz = vz + e;
    va = at::vec::fmadd(e, dx - (V::loadu(zs + k) - vms) * vinvT, va);
  }
  T z = hsum(vz), s = hsum(va);
  for (; k < K; ++k) {
    T dx = (x[k] - mx) * invT;
    T e = std::exp(dx);
    z += e;
    s += e * (dx - (zs[k] - ms) * invT);
  }
  zT = z;
  acc = s;
}

}  // namespace sub_logit_loss_math

// Forward phase 1: per sample, the student and teacher rows. sample_aux keeps (max z_s, log Z_T(z_s)) so the
// phase-2 rows form log P_s without cancellation.
template <typename T>
void sub_logit_loss_samples_kernel(const SubLogitLossFwdArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t K = a.K;
  const T invT = T(1.0 / a.temperature), T2 = T(a.temperature * a.temperature);
  const bool unit_T = a.temperature == 1.0;
  const T ls = T(a.label_smoothing), lsK = T(a.label_smoothing / double(K));
  std::unique_ptr<T[]> buf(new T[2 * K]);
  for (int64_t b = begin; b < end; ++b) {
    const T* zs = load_row<T>(a.student_logits, a.student_dtype, b * K, K, buf.get());
    const T* zt = load_row<T>(a.teacher_logits, a.teacher_dtype, b * K, K, buf.get() + K);
    T ms, sum_s, z1s, zTs;
    row_max_sum(zs, K, ms, sum_s);
    sub_logit_loss_math::exp_sums(zs, K, ms, invT, unit_T, z1s, zTs);
    const T mt = row_max(zt, K);
    T zTt, kd_acc;
    sub_logit_loss_math::kl_sums(zt, zs, K, mt, ms, invT, zTt, kd_acc);
    const T log_zTs = std::log(zTs), log_zTt = std::log(zTt), lse1s = ms + std::log(z1s);  // lse1s: for ce
    const int64_t y = a.target[b];
    const bool valid = y >= 0 && y < K;
    // A sample with an out-of-range target has NaN statistics (as on the CUDA backend).
    // The statistics are fp64 (the op's contract): max + log-sum, each computed in T, added in fp64.
    double* st = a.sample_stats + b * 3;
    st[0] = valid ? double(ms) + double(std::log(z1s)) : sub_logit_loss_math::nan<double>();
    st[1] = valid ? double(ms) / a.temperature + double(log_zTs) : sub_logit_loss_math::nan<double>();
    st[2] = valid ? double(mt) / a.temperature + double(log_zTt) : sub_logit_loss_math::nan<double>();
    a.sample_aux[b * 2] = ms;
    a.sample_aux[b * 2 + 1] = log_zTs;
    T* part = a.sample_partials + b * 2;
    part[0] = valid ? lse1s - (T(1) - ls) * zs[valid ? y : 0] - lsK * sum_s : sub_logit_loss_math::nan<T>();
    part[1] = valid ? T2 * (kd_acc / zTt - log_zTt + log_zTs) : sub_logit_loss_math::nan<T>();
  }
}

// Forward phase 2: per (stage, sample) r = s * B + b, the n sub-logit rows: CE and KL terms, row_stats, and
// the orthogonality hinge with its gradient coefficients M (n x n):
//   v_i = x_i - shift z_t (target entry = fill when masked), r_i = max(|v_i|, eps), G_ij = v_i.v_j / (r_i r_j),
//   c4 = 4 w_ol / (B n (n-1)), h_ij = relu(G_ij - theta),
//   M_ij = c4 h_ij / (r_i r_j) (i != j),  M_ii = -[|v_i| > eps] c4 sum_{j != i} h_ij G_ij / r_i^2.
template <typename T>
void sub_logit_loss_rows_kernel(const SubLogitLossFwdArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t B = a.B, n = a.n, K = a.K;
  const T invT = T(1.0 / a.temperature), T2 = T(a.temperature * a.temperature);
  const bool unit_T = a.temperature == 1.0;
  const T ls = T(a.label_smoothing), lsK = T(a.label_smoothing / double(K));
  const bool shifted = a.ortho_shift != 0.0 && n > 1;
  const T shift = T(a.ortho_shift), fill = T(a.mask_fill), eps = T(a.ortho_eps), theta = T(a.ortho_threshold);
  const T c4 = n > 1 ? T(4.0 * a.w_ol / (double(B) * double(n) * double(n - 1))) : T(0);
  std::unique_ptr<T[]> buf(new T[(2 + n + (shifted ? n : 0)) * K]);
  T *zs_buf = buf.get(), *zt_buf = zs_buf + K, *x_buf = zt_buf + K, *v_buf = x_buf + n * K;
  std::unique_ptr<const T*[]> xr(new const T*[2 * n]);
  const T** vr = xr.get() + n;
  std::unique_ptr<T[]> small(new T[n * n + 2 * n]);
  T *D = small.get(), *rn = D + n * n, *nrm = rn + n;

  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r % B;
    const int64_t y = a.target[b];
    double* rs = a.row_stats + r * n * 3;
    T* M = a.ortho_coef + r * n * n;
    T* part = a.row_partials + r * 3;
    if (!(y >= 0 && y < K)) {
      std::fill(rs, rs + n * 3, sub_logit_loss_math::nan<double>());
      std::fill(M, M + n * n, sub_logit_loss_math::nan<T>());
      std::fill(part, part + 3, sub_logit_loss_math::nan<T>());
      continue;
    }
    const T* zs = load_row<T>(a.student_logits, a.student_dtype, b * K, K, zs_buf);
    const T ms = a.sample_aux[b * 2], log_zTs = a.sample_aux[b * 2 + 1];
    for (int64_t i = 0; i < n; ++i) xr[i] = load_row<T>(a.sub_logits, a.sub_dtype, (r * n + i) * K, K, x_buf + i * K);
    if (shifted) {
      const T* zt = load_row<T>(a.teacher_logits, a.teacher_dtype, b * K, K, zt_buf);
      using V = Vec<T>;
      constexpr int64_t L = V::size();
      const V vshift(shift);
      for (int64_t i = 0; i < n; ++i) {
        T* v = v_buf + i * K;
        const T* x = xr[i];
        int64_t k = 0;
        for (; k + L <= K; k += L) (V::loadu(x + k) - vshift * V::loadu(zt + k)).store(v + k);
        for (; k < K; ++k) v[k] = x[k] - shift * zt[k];
        vr[i] = v;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) vr[i] = xr[i];
    }

    T sub_ce = 0, sub_kl = 0, hinge2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T* x = xr[i];
      T m, sum_x, z1, zT, kl_acc;
      row_max_sum(x, K, m, sum_x);
      sub_logit_loss_math::kl_sums(x, zs, K, m, ms, invT, zT, kl_acc);
      if (unit_T) {
        z1 = zT;  // P == p
      } else {
        T unused;
        sub_logit_loss_math::exp_sums(x, K, m, invT, /*unit_T=*/true, z1, unused);
      }
      const T lse1 = m + std::log(z1), log_zT = std::log(zT);
      const T kl = kl_acc / zT - log_zT + log_zTs;
      rs[i * 3] = double(m) + double(std::log(z1));
      rs[i * 3 + 1] = double(m) / a.temperature + double(log_zT);
      rs[i * 3 + 2] = double(kl);
      sub_ce += lse1 - (T(1) - ls) * x[y] - lsK * sum_x;
      sub_kl += T2 * kl;
    }

    if (n > 1) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = i; j < n; ++j) {
          T d = row_dot(vr[i], vr[j], K);
          // Masking replaces v_y by the fill value in both rows.
          if (a.mask_target) d = (d - vr[i][y] * vr[j][y]) + fill * fill;
          D[i * n + j] = D[j * n + i] = d;
        }
      for (int64_t i = 0; i < n; ++i) {
        nrm[i] = std::sqrt(D[i * n + i]);
        rn[i] = std::max(nrm[i], eps);
      }
      for (int64_t i = 0; i < n; ++i) {
        T diag = 0;
        for (int64_t j = 0; j < n; ++j) {
          if (j == i) continue;
          const T G = D[i * n + j] / (rn[i] * rn[j]);
          const T h = std::max(G - theta, T(0));
          hinge2 += h * h;
          M[i * n + j] = c4 * h / (rn[i] * rn[j]);
          diag += h * G;
        }
        // d max(|v|, eps) / dv = v / |v| where |v| > eps, 0 at equality (the reference's minimum-norm subgradient).
        M[i * n + i] = nrm[i] > eps ? -c4 * diag / (rn[i] * rn[i]) : T(0);
      }
    } else {
      M[0] = T(0);
    }
    part[0] = sub_ce;
    part[1] = sub_kl;
    part[2] = hinge2;
  }
}

// Backward over samples [begin, end): with g = grad_loss,
//   dz_s[b, k]    = g (w_gt/B (p_s - (1-ls)[k==y] - ls/K) + w_kd T/B (P_s - P_t) + w_kl T/(B n) sum_{s,i} (P_s - P_i))
//   dzf[s,b,i,k]  = g (w_gt/(B n) (p_i - (1-ls)[k==y] - ls/K) + [!detach] w_kl T/(B n) P_i (log P_i - log P_s - kl_i)
//                      + [!(masked and k==y)] sum_j M_ij v_j,k)
template <typename T>
void sub_logit_loss_bwd_kernel(const SubLogitLossBwdArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t S = a.S, B = a.B, n = a.n, K = a.K;
  const bool need_sub = a.grad_sub_logits != nullptr, need_zs = a.grad_student_logits != nullptr;
  const T invT = T(1.0 / a.temperature);
  const bool unit_T = a.temperature == 1.0;
  const T ls = T(a.label_smoothing), lsK = T(a.label_smoothing / double(K)), one_ls = T(1) - ls;
  const T a_ce = T(a.w_gt / double(B)), a_kd = T(a.w_kd * a.temperature / double(B));
  const T a_sce = T(a.w_gt / (double(B) * double(n))), a_skl = T(a.w_kl * a.temperature / (double(B) * double(n)));
  const T a_x = a.detach_sub_targets ? T(0) : a_skl;
  const T cq = a_kd + T(double(S) * double(n)) * a_skl;
  const bool shifted = a.ortho_shift != 0.0 && n > 1;
  const T shift = T(a.ortho_shift);
  const T g = *a.grad_loss;
  const V vg(g);

  // zs, zt, ds = (z_s - max) / T, the dz_s accumulator, the output rows, e1 = exp(x - m), eT = exp((x - m)/T),
  // then the n rows of the current (s, b) and their orthogonality rows v.
  std::unique_ptr<T[]> buf(new T[(7 + n + (shifted ? n : 0)) * K]);
  T *zs_buf = buf.get(), *zt_buf = zs_buf + K, *ds = zt_buf + K, *acc = ds + K, *osub = acc + K, *ozs = osub + K,
    *e1 = ozs + K, *x_buf = e1 + K, *v_buf = x_buf + n * K;
  std::unique_ptr<T[]> eT_buf(unit_T ? nullptr : new T[K]);
  T* eT = unit_T ? e1 : eT_buf.get();
  std::unique_ptr<const T*[]> xr(new const T*[2 * n]);
  const T** vr = xr.get() + n;

  for (int64_t b = begin; b < end; ++b) {
    const int64_t y = a.target[b];
    if (!(y >= 0 && y < K)) {
      if (need_zs) {
        T* o = out_row<T>(a.grad_student_logits, a.grad_student_dtype, b * K, ozs);
        std::fill(o, o + K, sub_logit_loss_math::nan<T>());
        store_row<T>(a.grad_student_logits, a.grad_student_dtype, b * K, o, K);
      }
      if (need_sub)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t i = 0; i < n; ++i) {
            const int64_t off = ((s * B + b) * n + i) * K;
            T* o = out_row<T>(a.grad_sub_logits, a.grad_sub_dtype, off, osub);
            std::fill(o, o + K, sub_logit_loss_math::nan<T>());
            store_row<T>(a.grad_sub_logits, a.grad_sub_dtype, off, o, K);
          }
      continue;
    }
    const T* zs = load_row<T>(a.student_logits, a.student_dtype, b * K, K, zs_buf);
    const T ms = row_max(zs, K);
    T z1s, zTs;
    sub_logit_loss_math::exp_sums(zs, K, ms, invT, unit_T, z1s, zTs);
    const T log_zTs = std::log(zTs);
    {
      const V vms(ms), vinvT(invT);
      int64_t k = 0;
      for (; k + L <= K; k += L) ((V::loadu(zs + k) - vms) * vinvT).store(ds + k);
      for (; k < K; ++k) ds[k] = (zs[k] - ms) * invT;
    }
    // dz_s before the rows: a_ce (p_s - ls/K) + (a_kd + S n a_skl) P_s - a_kd P_t; each row subtracts a_skl P_i.
    if (need_zs) {
      const T* zt = load_row<T>(a.teacher_logits, a.teacher_dtype, b * K, K, zt_buf);
      const T mt = row_max(zt, K);
      T z1t_unused, zTt;
      sub_logit_loss_math::exp_sums(zt, K, mt, invT, unit_T, z1t_unused, zTt);
      const T inv_z1s = T(1) / z1s, inv_zTs = T(1) / zTs, inv_zTt = T(1) / zTt;
      const V vms(ms), vmt(mt), vinvT(invT), vinv_z1s(inv_z1s), vinv_zTs(inv_zTs), vinv_zTt(inv_zTt), vace(a_ce),
          vlsK(a_ce * lsK), vcq(cq), vakd(a_kd);
      int64_t k = 0;
      for (; k + L <= K; k += L) {
        V ps = vexp(V::loadu(zs + k) - vms) * vinv_z1s;
        V Ps = unit_T ? ps : vexp(V::loadu(ds + k)) * vinv_zTs;
        V Pt = vexp((V::loadu(zt + k) - vmt) * vinvT) * vinv_zTt;
        at::vec::fmadd(vace, ps, at::vec::fmadd(vcq, Ps, -(vlsK + vakd * Pt))).store(acc + k);
      }
      for (; k < K; ++k) {
        T ps = std::exp(zs[k] - ms) * inv_z1s;
        T Ps = unit_T ? ps : std::exp(ds[k]) * inv_zTs;
        T Pt = std::exp((zt[k] - mt) * invT) * inv_zTt;
        acc[k] = a_ce * ps + cq * Ps - (a_ce * lsK + a_kd * Pt);
      }
      acc[y] -= a_ce * one_ls;
    }

    for (int64_t s = 0; s < S; ++s) {
      const int64_t row0 = (s * B + b) * n;
      const double* rs = a.row_stats + row0 * 3;
      const T* M = a.ortho_coef + row0 * n;
      for (int64_t i = 0; i < n; ++i) xr[i] = load_row<T>(a.sub_logits, a.sub_dtype, (row0 + i) * K, K, x_buf + i * K);
      bool ortho = false;
      if (need_sub && n > 1)
        for (int64_t q = 0; q < n * n; ++q) ortho = ortho || M[q] != T(0);
      if (ortho && shifted) {
        const T* zt = load_row<T>(a.teacher_logits, a.teacher_dtype, b * K, K, zt_buf);
        const V vshift(shift);
        for (int64_t j = 0; j < n; ++j) {
          T* v = v_buf + j * K;
          const T* x = xr[j];
          int64_t k = 0;
          for (; k + L <= K; k += L) (V::loadu(x + k) - vshift * V::loadu(zt + k)).store(v + k);
          for (; k < K; ++k) v[k] = x[k] - shift * zt[k];
          vr[j] = v;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) vr[j] = xr[j];
      }

      for (int64_t i = 0; i < n; ++i) {
        const T* x = xr[i];
        const T m = row_max(x, K);
        // e1 = exp(x - m) and eT = exp((x - m) / T), kept for the gradient pass.
        T z1 = 0, zT = 0;
        {
          const V vm(m), vinvT(invT);
          V v1(T(0)), vT(T(0));
          int64_t k = 0;
          for (; k + L <= K; k += L) {
            V d = V::loadu(x + k) - vm;
            V e = vexp(d);
            e.store(e1 + k);
            v1 = v1 + e;
            if (!unit_T) {
              V f = vexp(d * vinvT);
              f.store(eT + k);
              vT = vT + f;
            }
          }
          z1 = hsum(v1);
          zT = hsum(vT);
          for (; k < K; ++k) {
            const T d = x[k] - m;
            e1[k] = std::exp(d);
            z1 += e1[k];
            if (!unit_T) {
              eT[k] = std::exp(d * invT);
              zT += eT[k];
            }
          }
          if (unit_T) zT = z1;
        }
        const T inv_z1 = T(1) / z1, inv_zT = T(1) / zT;
        if (need_zs) {
          const V vneg(-a_skl * inv_zT);
          int64_t k = 0;
          for (; k + L <= K; k += L) at::vec::fmadd(vneg, V::loadu(eT + k), V::loadu(acc + k)).store(acc + k);
          for (; k < K; ++k) acc[k] += -a_skl * inv_zT * eT[k];
        }
        if (!need_sub) continue;
        // log P_i - log P_s - kl_i = (x - m)/T - ds + c0.
        const T c0 = -std::log(zT) + log_zTs - T(rs[i * 3 + 2]);
        const T* Mi = M + i * n;
        bool row_ortho = false;
        for (int64_t j = 0; j < n && ortho; ++j) row_ortho = row_ortho || Mi[j] != T(0);
        const int64_t off = (row0 + i) * K;
        T* o = out_row<T>(a.grad_sub_logits, a.grad_sub_dtype, off, osub);
        auto elem = [&](int64_t k) {
          const T p = e1[k] * inv_z1, P = eT[k] * inv_zT;
          return a_sce * (p - lsK) + a_x * P * ((x[k] - m) * invT - ds[k] + c0);
        };
        {
          const V vm(m), vinvT(invT), vinv_z1(inv_z1), vinv_zT(inv_zT), vsce(a_sce), vnlsK(-a_sce * lsK), vax(a_x),
              vc0(c0);
          int64_t k = 0;
          for (; k + L <= K; k += L) {
            V P = V::loadu(eT + k) * vinv_zT;
            V t = (V::loadu(x + k) - vm) * vinvT - V::loadu(ds + k) + vc0;
            V d = at::vec::fmadd(vsce, V::loadu(e1 + k) * vinv_z1, at::vec::fmadd(vax * P, t, vnlsK));
            if (row_ortho)
              for (int64_t j = 0; j < n; ++j) d = at::vec::fmadd(V(Mi[j]), V::loadu(vr[j] + k), d);
            (vg * d).store(o + k);
          }
          for (; k < K; ++k) {
            T d = elem(k);
            if (row_ortho)
              for (int64_t j = 0; j < n; ++j) d += Mi[j] * vr[j][k];
            o[k] = g * d;
          }
        }
        // The target entry: the one-hot part of CE, and no orthogonality term when it is masked.
        {
          T d = elem(y) - a_sce * one_ls;
          if (row_ortho && !a.mask_target)
            for (int64_t j = 0; j < n; ++j) d += Mi[j] * vr[j][y];
          o[y] = g * d;
        }
        store_row<T>(a.grad_sub_logits, a.grad_sub_dtype, off, o, K);
      }
    }
    if (need_zs) {
      T* o = out_row<T>(a.grad_student_logits, a.grad_student_dtype, b * K, ozs);
      int64_t k = 0;
      for (; k + L <= K; k += L) (vg * V::loadu(acc + k)).store(o + k);
      for (; k < K; ++k) o[k] = g * acc[k];
      store_row<T>(a.grad_student_logits, a.grad_student_dtype, b * K, o, K);
    }
  }
}

}  // namespace hcd_fast::cpu::CPU_CAPABILITY
