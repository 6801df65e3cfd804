// CUDA fused HCD sub-logit loss (SPEC section 2, items 4-6): one block per sample b handles the student
// and teacher rows and all S*n sub-logit rows of that sample, so the student's log-softmax is computed once
// and its gradient row has one owner (no atomics). Gradients are written in the forward (the loss is the
// last node: backward only scales by grad_output). Per-sample partial sums go to a (B, 5) buffer that a
// second single-block kernel reduces in a fixed order (deterministic).
//
// Row math (x one sub-logit row, q = softmax(z_s/T), p = softmax(x/T), s1 = softmax(x)):
//   CE_ls  = lse(x) - (1-ls) x_y - ls/K sum x,          dx = s1 - (1-ls) e_y - ls/K
//   T^2 KL(p||q),                                       dx = T p (log p - log q - KL),  dz_s = T (q - p)
//   orthogonality (per stage and sample, n rows): d v_i = sum_j C_ij v_j with C from the hinge on the
//   normalised Gram matrix (see csrc/cpu/sub_logit_loss_kernel.h for the derivation).
// Each thread owns the columns k = tid + j*blockDim.x in every pass that parks values in global scratch
// (log q, exp(x - max)), so it reads them back without a barrier. The reduction-only passes (row max/sum,
// Gram) read the sub-logit rows with 16-byte loads when the rows are aligned.
#include "cuda/common.cuh"
#include "ops.h"

namespace hcd_fast::cuda {
namespace {

struct LossParams {
  double temperature, label_smoothing, ortho_threshold, ortho_eps, fill, shift;
  double w_gt, w_kd, w_kl, w_ol;
  bool masked, detach;
  bool vec16;  // sub-logit rows are 16-byte aligned: the reduction-only passes (A, Gram) use 16-byte loads
};

// 16 bytes of scalar_t, loaded as one vector instruction.
template <typename scalar_t>
struct alignas(16) Pack16 {
  static constexpr int N = 16 / sizeof(scalar_t);
  scalar_t v[N];
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxRowThreads) sub_logit_loss_rows_kernel(const scalar_t* __restrict__ sub, const scalar_t* __restrict__ zs,
                                           const scalar_t* __restrict__ zt, const int64_t* __restrict__ target,
                                           acc_t* __restrict__ grad_sub, acc_t* __restrict__ grad_zs,
                                           acc_t* __restrict__ logq, acc_t* __restrict__ partials,
                                           acc_t* __restrict__ gscratch, int64_t S, int64_t B, int64_t n, int64_t K,
                                           LossParams p) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);  // 3 * 32 reduction scratch
  // Per-sample n-vectors and n x n matrices: in shared memory, or (large n) in this block's global slice.
  acc_t* m = gscratch != nullptr ? gscratch + blockIdx.x * (4 * n + 2 * n * n) : ws + 3 * kWarp;
  acc_t *Z1 = m + n, *ZT = Z1 + n, *klraw = ZT + n, *D = klraw + n, *C = D + n * n;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const bool grad = grad_sub != nullptr;
  const acc_t Tt = acc_t(p.temperature), invT = acc_t(1) / Tt, T2 = Tt * Tt;
  const acc_t ls = acc_t(p.label_smoothing), lsK = ls / acc_t(K);
  const acc_t a_ce = acc_t(p.w_gt / B), a_kd = acc_t(p.w_kd * p.temperature / B);
  const acc_t a_sce = acc_t(p.w_gt / (B * n)), a_skl = acc_t(p.w_kl * p.temperature / (B * n));
  const acc_t ol_norm = n > 1 ? acc_t(1.0 / (double(B) * n * (n - 1))) : acc_t(0);
  const acc_t NEG_INF = -INFINITY;
  const int64_t y = target[b];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K);  // targets are range-checked on the host only with validate=True

  const scalar_t* xs = zs + b * K;
  const scalar_t* xt = zt + b * K;
  acc_t* lq = logq + b * K;
  acc_t* gzs = grad ? grad_zs + b * K : nullptr;

  // Student row: max and sum, then the normalisers at T = 1 and at T, then log q.
  acc_t mloc = NEG_INF, sloc = 0;
  for (int64_t k = tid; k < K; k += nt) {
    acc_t x = acc_t(xs[k]);
    mloc = max(mloc, x);
    sloc += x;
  }
  const acc_t ms = block_max(mloc, ws);
  const acc_t sum_s = block_sum1(sloc, ws);
  acc_t zz[2] = {0, 0};
  for (int64_t k = tid; k < K; k += nt) {
    acc_t d = acc_t(xs[k]) - ms;
    zz[0] += dev_exp(d);
    zz[1] += dev_exp(d * invT);
  }
  block_sum<2>(zz, ws);
  const acc_t lse1s = ms + dev_log(zz[0]);
  // log q = (x - max) / T - log Z: never x / T - (max / T + log Z), which loses log q's low bits at large logits.
  const acc_t logzs = dev_log(zz[1]);
  for (int64_t k = tid; k < K; k += nt) lq[k] = (acc_t(xs[k]) - ms) * invT - logzs;

  // Teacher row: KD = T^2 (sum_k pt_k ((xt_k - mt)/T - log q_k) / Zt - log Zt).
  mloc = NEG_INF;
  for (int64_t k = tid; k < K; k += nt) mloc = max(mloc, acc_t(xt[k]));
  const acc_t mt = block_max(mloc, ws);
  acc_t tk[2] = {0, 0};
  for (int64_t k = tid; k < K; k += nt) {
    acc_t d = (acc_t(xt[k]) - mt) * invT;
    acc_t e = dev_exp(d);
    tk[0] += e;
    tk[1] += e * (d - lq[k]);
  }
  block_sum<2>(tk, ws);
  const acc_t logzt = dev_log(tk[0]);
  const acc_t kd_b = T2 * (tk[1] / tk[0] - logzt);
  const acc_t ce_b = lse1s - (acc_t(1) - ls) * acc_t(xs[y]) - lsK * sum_s;

  // Student gradient: CE + KD + the q half of every sub-logit KL row; the -p halves are subtracted below.
  if (grad) {
    const acc_t cq = a_kd + acc_t(S * n) * a_skl, inv_z1 = acc_t(1) / zz[0];
    for (int64_t k = tid; k < K; k += nt) {
      acc_t x = acc_t(xs[k]);
      acc_t s1 = dev_exp(x - ms) * inv_z1;
      acc_t pt = dev_exp((acc_t(xt[k]) - mt) * invT - logzt);
      acc_t g = a_ce * (s1 - lsK) + cq * dev_exp(lq[k]) - a_kd * pt;
      if (k == y) g -= a_ce * (acc_t(1) - ls);
      gzs[k] = g;
    }
  }

  acc_t sub_ce_b = 0, sub_kl_b = 0, ol_b = 0;
  const acc_t fill = acc_t(p.fill), shift = acc_t(p.shift);
  const bool shifted = p.shift != 0.0;  // ortho_on="raw": orthogonality rows u_i = x_i - shift z_t
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row0 = (s * B + b) * n;
    const scalar_t* x0 = sub + row0 * K;
    acc_t* g0 = grad ? grad_sub + row0 * K : nullptr;

    // Pass A: row maxima and sums (the sums feed the label-smoothing term).
    acc_t sumx_i[1];
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* x = x0 + i * K;
      acc_t mi = NEG_INF, si = 0;
      if (p.vec16) {  // 16-byte loads: every row starts 16-byte aligned (checked on the host)
        const Pack16<scalar_t>* xv = reinterpret_cast<const Pack16<scalar_t>*>(x);
        for (int64_t c = tid; c < K / Pack16<scalar_t>::N; c += nt) {
          const Pack16<scalar_t> pk = xv[c];
#pragma unroll
          for (int j = 0; j < Pack16<scalar_t>::N; ++j) {
            const acc_t v = acc_t(pk.v[j]);
            mi = max(mi, v);
            si += v;
          }
        }
      } else {
        for (int64_t k = tid; k < K; k += nt) {
          acc_t v = acc_t(x[k]);
          mi = max(mi, v);
          si += v;
        }
      }
      mi = block_max(mi, ws);
      sumx_i[0] = block_sum1(si, ws);
      if (tid == 0) m[i] = mi;
      sub_ce_b -= lsK * sumx_i[0];
      sub_ce_b -= (acc_t(1) - ls) * acc_t(x[y]);
    }
    // Gram matrix of the masked rows: x_i . x_j with the target entry replaced by the fill value.
    if (n > 1) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = i; j < n; ++j) {
          acc_t d = 0;
          if (shifted) {
            for (int64_t k = tid; k < K; k += nt) {
              const acc_t zk = shift * acc_t(xt[k]);
              d += (acc_t(x0[i * K + k]) - zk) * (acc_t(x0[j * K + k]) - zk);
            }
          } else if (p.vec16) {
            const Pack16<scalar_t>* xi = reinterpret_cast<const Pack16<scalar_t>*>(x0 + i * K);
            const Pack16<scalar_t>* xj = reinterpret_cast<const Pack16<scalar_t>*>(x0 + j * K);
            for (int64_t c = tid; c < K / Pack16<scalar_t>::N; c += nt) {
              const Pack16<scalar_t> a = xi[c], bb = xj[c];
#pragma unroll
              for (int q = 0; q < Pack16<scalar_t>::N; ++q) d += acc_t(a.v[q]) * acc_t(bb.v[q]);
            }
          } else {
            for (int64_t k = tid; k < K; k += nt) d += acc_t(x0[i * K + k]) * acc_t(x0[j * K + k]);
          }
          d = block_sum1(d, ws);
          if (p.masked) {
            const acc_t zy = shifted ? shift * acc_t(xt[y]) : acc_t(0);
            d += fill * fill - (acc_t(x0[i * K + y]) - zy) * (acc_t(x0[j * K + y]) - zy);
          }
          if (tid == 0) D[i * n + j] = D[j * n + i] = d;
        }
    }
    __syncthreads();

    // Pass B: softmax normalisers and KL(p || q) per row; exp(x - max) parked in the gradient row.
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* x = x0 + i * K;
      acc_t* g = grad ? g0 + i * K : nullptr;
      const acc_t mi = m[i];
      acc_t r[3] = {0, 0, 0};
      for (int64_t k = tid; k < K; k += nt) {
        acc_t v = acc_t(x[k]);
        acc_t e1 = dev_exp(v - mi);
        acc_t eT = dev_exp((v - mi) * invT);
        r[0] += e1;
        r[1] += eT;
        r[2] += eT * ((v - mi) * invT - lq[k]);
        if (g) g[k] = e1;
      }
      block_sum<3>(r, ws);
      const acc_t lse1 = mi + dev_log(r[0]);
      const acc_t kl = r[2] / r[1] - dev_log(r[1]);
      if (tid == 0) {
        Z1[i] = r[0];
        ZT[i] = r[1];
        klraw[i] = kl;
      }
      sub_ce_b += lse1;
      sub_kl_b += T2 * kl;
    }

    // Orthogonality hinge and its gradient coefficients (thread 0; n x n is tiny).
    if (tid == 0 && n > 1) {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t di = max(sqrt(D[i * n + i]), acc_t(p.ortho_eps));
        acc_t diag = 0;
        for (int64_t j = 0; j < n; ++j) {
          if (j == i) continue;
          const acc_t dj = max(sqrt(D[j * n + j]), acc_t(p.ortho_eps));
          const acc_t G = D[i * n + j] / (di * dj);
          const acc_t h = max(G - acc_t(p.ortho_threshold), acc_t(0));
          ol_b += h * h;
          const acc_t gij = acc_t(p.w_ol) * acc_t(2) * h * ol_norm;
          C[i * n + j] = acc_t(2) * gij / (di * dj);
          diag += gij * G;
        }
        const bool clamped = sqrt(D[i * n + i]) < acc_t(p.ortho_eps);
        C[i * n + i] = clamped ? acc_t(0) : acc_t(-2) * diag / (di * di);
      }
    }
    __syncthreads();

    // Pass C: gradient of every row; the -a_skl p part of the student gradient.
    if (grad) {
      const bool ortho = n > 1 && p.w_ol != 0.0;
      const acc_t a_x = p.detach ? acc_t(0) : a_skl;
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* x = x0 + i * K;
        acc_t* g = g0 + i * K;
        const acc_t mi = m[i], inv_z1 = acc_t(1) / Z1[i], inv_zT = acc_t(1) / ZT[i], kl = klraw[i];
        const acc_t logzT = dev_log(ZT[i]);
        for (int64_t k = tid; k < K; k += nt) {
          const acc_t v = acc_t(x[k]);
          const acc_t s1 = g[k] * inv_z1;
          const acc_t pk = dev_exp((v - mi) * invT) * inv_zT;
          acc_t gk = a_sce * (s1 - lsK) + a_x * pk * ((v - mi) * invT - logzT - lq[k] - kl);
          if (k == y) gk -= a_sce * (acc_t(1) - ls);
          if (ortho && !(p.masked && k == y)) {
            const acc_t zk = shifted ? shift * acc_t(xt[k]) : acc_t(0);
            for (int64_t j = 0; j < n; ++j) gk += C[i * n + j] * (acc_t(x0[j * K + k]) - zk);
          }
          g[k] = gk;
          gzs[k] -= a_skl * pk;
        }
      }
    }
    __syncthreads();  // m, Z1, ... and C are rewritten by the next stage
  }
  if (tid == 0) {
    acc_t* out = partials + b * 5;
    out[0] = ce_b;
    out[1] = sub_ce_b;
    out[2] = kd_b;
    out[3] = sub_kl_b;
    out[4] = ol_b;
  }
}

// Second launch: the batch reduction of the (B, 5) partials in a fixed order, then the weighted total.
template <typename acc_t>
__global__ void sub_logit_loss_reduce_kernel(const acc_t* __restrict__ partials, acc_t* __restrict__ loss,
                                             acc_t* __restrict__ parts, int64_t B, int64_t n, LossParams p) {
  __shared__ acc_t ws[5 * kWarp];
  acc_t v[5] = {0, 0, 0, 0, 0};
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x)
#pragma unroll
    for (int j = 0; j < 5; ++j) v[j] += partials[b * 5 + j];
  block_sum<5>(v, ws);
  if (threadIdx.x == 0) {
    const acc_t rows = acc_t(B) * acc_t(n);
    const acc_t pv[5] = {v[0] / acc_t(B), v[1] / rows, v[2] / acc_t(B), v[3] / rows,
                         n > 1 ? v[4] / (rows * acc_t(n - 1)) : acc_t(0)};
    for (int j = 0; j < 5; ++j) parts[j] = pv[j];
    *loss = acc_t(p.w_gt) * (pv[0] + pv[1]) + acc_t(p.w_kd) * pv[2] + acc_t(p.w_kl) * pv[3] + acc_t(p.w_ol) * pv[4];
  }
}

}  // namespace

SubLogitLossOut sub_logit_loss(HCD_SUB_LOGIT_LOSS_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(sub_logits.is_cuda() && sub_logits.dim() == 4, "sub_logits: expected a CUDA (S, B, n, K) tensor");
  const c10::cuda::CUDAGuard guard(sub_logits.device());
  const auto in_dtype = at::promote_types(sub_logits.scalar_type(),
                                          at::promote_types(student_logits.scalar_type(), teacher_logits.scalar_type()));
  const auto dt = compute_dtype({in_dtype});
  const Tensor sub = sub_logits.to(in_dtype).contiguous();
  const Tensor zs = student_logits.to(in_dtype).contiguous();
  const Tensor zt = teacher_logits.to(in_dtype).contiguous();
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t S = sub.size(0), B = sub.size(1), n = sub.size(2), K = sub.size(3);
  const auto opts = sub.options().dtype(dt);
  Tensor gsub = compute_grad ? at::empty({S, B, n, K}, opts) : at::empty({0}, opts);
  Tensor gzs = compute_grad ? at::empty({B, K}, opts) : at::empty({0}, opts);
  Tensor logq = at::empty({B, K}, opts);
  Tensor partials = at::empty({B, 5}, opts);
  Tensor parts = at::empty({5}, opts);
  Tensor loss = at::empty({}, opts);
  if (B == 0) return {loss.zero_(), parts.zero_(), gsub, gzs};

  LossParams p{temperature, label_smoothing, ortho_threshold, ortho_eps, mask_fill, ortho_shift,
               w_gt, w_kd, w_kl, w_ol, mask_target, detach_sub_targets, false};
  // 16-byte loads need every row start aligned: an aligned base and K * itemsize a multiple of 16.
  p.vec16 = reinterpret_cast<uintptr_t>(sub.data_ptr()) % 16 == 0 && (K * sub.element_size()) % 16 == 0;
  const int threads = row_threads(K);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "hcd_fast_sub_logit_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The per-sample scratch (4n + 2n^2 values) lives in shared memory up to the device's opt-in limit
    // (above the default 48 KB the kernel opts in), else in global memory: any n runs.
    auto kernel = sub_logit_loss_rows_kernel<scalar_t, acc_t>;
    const size_t per_sample = size_t(4 * n + 2 * n * n) * sizeof(acc_t);
    size_t smem = 3 * kWarp * sizeof(acc_t) + per_sample;
    const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    Tensor gscratch;
    if (smem > optin) {
      gscratch = at::empty({B, 4 * n + 2 * n * n}, opts);
      smem = 3 * kWarp * sizeof(acc_t);
    } else if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    }
    kernel<<<B, threads, smem, stream>>>(
        sub.data_ptr<scalar_t>(), zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), y.data_ptr<int64_t>(),
        compute_grad ? gsub.data_ptr<acc_t>() : nullptr, compute_grad ? gzs.data_ptr<acc_t>() : nullptr,
        logq.data_ptr<acc_t>(), partials.data_ptr<acc_t>(),
        gscratch.defined() ? gscratch.data_ptr<acc_t>() : nullptr, S, B, n, K, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sub_logit_loss_reduce_kernel<acc_t><<<1, 256, 0, stream>>>(partials.data_ptr<acc_t>(), loss.data_ptr<acc_t>(),
                                                               parts.data_ptr<acc_t>(), B, n, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, parts, gsub, gzs};
}

}  // namespace hcd_fast::cuda
