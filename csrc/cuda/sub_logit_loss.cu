// CUDA fused HCD sub-logit loss (SPEC section 2, items 4-6; the issue-11 design, hcd_fast/ops/sub_logit_loss.py).
// The forward writes the loss, its parts and small statistics; the backward recomputes the gradient from the
// inputs and those statistics, reads grad_loss from device memory, and writes dzf and dz_s once each, in the
// inputs' dtypes. No host synchronisation, no atomics: every output element has one writer.
//
// Math (x = zf[s, b, i, :], p = softmax(x), P = softmax(x / T), P_s = softmax(z_s / T), p_s = softmax(z_s),
// P_t = softmax(z_t / T), g = grad_loss, y the target):
//   row_stats[s, b, i] = (lse(x), lse(x / T), kl_i = sum_k P_k (log P_k - log P_s,k)),   fp64
//   sample_stats[b]    = (lse(z_s), lse(z_s / T), lse(z_t / T)),                         fp64
//     (max and log-sum computed in acc, added in fp64; the backward splits a statistic into hi = acc(lse),
//     lo = acc(lse - hi) and forms (x - hi) - lo, so an fp32 lse's rounding (2^-24 |lse|) never reaches P),
//   ortho_coef M (n x n per (s, b)): d(w_ol OL)/d v_i = sum_j M_ij v_j, v_i = x_i - shift z_t (target entry =
//     fill when masked), r_i = max(|v_i|, eps), G = v v^T / (r r^T), h = relu(G - theta), c4 = 4 w_ol / (B n (n-1)),
//     M_ij = c4 h_ij / (r_i r_j) (i != j), M_ii = -[|v_i| > eps] c4 sum_{j != i} h_ij G_ij / r_i^2.
//   dz_s[b, k]   = g (w_gt/B (p_s - (1-ls)[k==y] - ls/K) + w_kd T/B (P_s - P_t) + w_kl T/(B n) sum_{s,i} (P_s - P_i))
//   dzf[s,b,i,k] = g (w_gt/(B n) (p_i - (1-ls)[k==y] - ls/K) + [!detach] w_kl T/(B n) P_i (log P_i - log P_s - kl_i)
//                     + [!(masked and k == y)] sum_j M_ij v_j,k)
//
// Kernels (P = max(S, 1) blocks per sample; S = 0 leaves one block per sample for CE and KD):
//   sub_logit_loss_fwd_kernel          n <= 8 (kLaneMaxRows; fp64 n <= 4), the one-pass forward. Grid P*B
//       blocks, block r = b * P + s (a sample's stage blocks adjacent: z_s read from DRAM once, from L2 by the others).
//       ONE pass over K: each thread owns kVec consecutive elements of every row per step (16-byte vectors of zf,
//       8-byte for fp16 and for 16-bit zf with fp32 sides, 2 elements at n = 5..8, where the rows are 16-byte aligned
//       and K % kVec == 0; all the step's loads issued before its arithmetic: n + 1 vectors in flight, n + 2 with
//       ortho_shift) and keeps its own online state in registers: per row the max, sum exp at T = 1 and at T, the KL
//       numerator, the row sum, the upper triangle of the n x n Gram; z_s / T's (max, sum). Then ONE block reduction:
//       the block max of the n + 1 maxima (one barrier), each thread's sums rescaled to it, reduce-scatters of the sums
//       inside each warp, 32 at a time (31 shuffles; lane l ends with value l; 8 rows: 3 of them), one barrier, value
//       t's warp partials added in warp order by thread t. The n x n tail is spread over n threads (thread i: row i's
//       statistics, CE, KL and row i of M). The s == 0 block then reads z_s, z_t once more (L2) for CE, KD and
//       sample_stats.
//   sub_logit_loss_fwd_large_n_kernel  n > 8 (fp64 n > 4): the multi-pass forward (max/sum pass, exp/KL
//       pass, one Gram dot product per pair; the repeated passes over the block's own rows hit L1/L2), D in shared
//       memory; the n x n tail one row per thread.
//   sub_logit_loss_reduce_kernel       one block: the (P*B, 5) partials summed in a fixed order -> parts, loss.
//   sub_logit_loss_bwd_kernel          grid (B, K-blocks), kPerThread columns per thread: loads z_s, z_t of its
//       columns, then for every (s, i) the zf column (the n values of a (s, b) in registers when n <= kRegRows),
//       writes dzf, and accumulates dz_s in registers; writes dz_s last. Runs whenever B K > 0 (S = 0 too).
// A target outside [0, K) (validate=False) gives NaN partials, statistics and gradient rows for that sample;
// nothing is read at that index (no device assert, no clamping).
//
// Byte model (DRAM traffic; e = bytes per element of zf / z_s / z_t and of their gradients; R = S B n K, Z = B K):
//   essential = read zf + write dzf + read z_s, z_t + write dz_s              = (2 R + 3 Z) e
//   moved     = fwd: read zf, z_s, z_t once                                   (R + 2 Z) e
//             + bwd: read zf, z_s, z_t, write dzf, dz_s once                   (2 R + 3 Z) e
//             + small: row_stats S B n 3 fp64, sample_stats 3 B fp64, ortho_coef S B n n acc (written once, read
//               once), partials S B 5 acc (written, read), targets 8 B twice
//             = (3 R + 5 Z) e + 2 (24 S B n + 4 S B n^2 + 24 B) + 40 S B + 16 B        (acc = fp32)
//   i.e. zf crosses DRAM 3 times against the essential 2 (1.5x); the S - 1 re-reads of z_s per sample (and of
//   z_t with ortho_shift != 0) and the per-row repeated passes of the forward hit L2/L1 and are not counted.
//   S = 4, n = 4 (decimal MB; benchmarks.cases.sub_logit_loss_bytes):
//     ImageNet-like B = 256,  K = 1000: fp32 essential  35.84, moved  54.66 (1.53x); bf16  17.92 /  27.52 (1.54x)
//     CIFAR-like    B = 128,  K = 100:  fp32 essential   1.79, moved   2.91 (1.62x); bf16   0.90 /   1.55 (1.73x)
//     large batch   B = 4096, K = 1000: fp32 essential 573.47, moved 874.51 (1.53x); bf16 286.75 / 440.34 (1.54x)
//   (the small terms are 0.39 MB at ImageNet-like, 0.19 MB at CIFAR-like, where they dominate the excess).
//   The forward alone at B = 4096, K = 1000: fp32 294.94 MB read + 3.05 MB of statistics written, bf16
//   147.49 + 3.05; its target, read against a GPU results file (never asserted): >= 75% of the measured copy
//   bandwidth. Not yet run on a GPU.
// Mixed dtypes: z_s / z_t of another dtype than zf are read as fp32 (converted once on the host side, B K
// elements); with fp64 anywhere everything runs in fp64; a gradient whose dtype the kernel cannot write directly
// (those two cases) is converted once after the kernel.
#include <limits>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops.h"

namespace hcd_fast::cuda {
namespace {

// Scalars with every quotient formed on the host in fp64 (no division in the kernels' hot loops, and no
// divide subroutine calls: those cost a stack frame and register spills around the call).
struct FwdParams {
  double inv_t, t2, label_smoothing, ls_k, ortho_threshold, ortho_eps, fill, shift, c4;
  bool unit_t, masked;
};

struct BwdParams {
  double inv_t, ls_k, one_ls, a_ce, a_kd, a_sce, a_skl, a_x, cq, shift;
  bool masked;
};

template <typename acc_t>
__device__ __forceinline__ acc_t dev_nan() {
  return acc_t(NAN);
}

// An fp64 statistic as hi + lo in acc_t: (x - hi) - lo keeps acc_t accuracy where x is near the statistic.
template <typename acc_t>
__device__ __forceinline__ void split_stat(double v, acc_t& hi, acc_t& lo) {
  hi = acc_t(v);
  lo = acc_t(v - double(hi));
}

// n > kLaneMaxRows (fp64: n > kLaneRows): one block per (stage, sample), several passes over the block's rows
// (max/sum, exp/KL, then one Gram dot product per pair; the repeated passes hit L1/L2). Dynamic shared memory:
// 3 * 32 reduction values, then D (n x n) and the norms (n) unless `scratch` (a global slice per block) is given
// for large n.
// P = max(S, 1) blocks per sample: with S = 0 the one block per sample does CE and KD only (n_rows = 0).
// __launch_bounds__(.., 1): ptxas may use up to 128 registers (fp64: 87, no spills); with the thread count
// alone it aimed at 64 and spilled 80 bytes in the fp64 instantiation.
template <typename scalar_t, typename side_t, typename acc_t>
__global__ void __launch_bounds__(kMaxRowThreads, 1)
    sub_logit_loss_fwd_large_n_kernel(const scalar_t* __restrict__ sub, const side_t* __restrict__ zs,
                   const side_t* __restrict__ zt, const int64_t* __restrict__ target, double* __restrict__ row_stats,
                   acc_t* __restrict__ ortho_coef, double* __restrict__ sample_stats, acc_t* __restrict__ partials,
                   acc_t* __restrict__ scratch, int64_t S, int64_t B, int64_t n_all, int64_t K, FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // read as acc_t (double): 16-byte aligned
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);
  const unsigned P = S > 0 ? unsigned(S) : 1u;
  const int64_t r = blockIdx.x, b = int64_t(blockIdx.x / P), s = int64_t(blockIdx.x % P);
  const int64_t n = S > 0 ? n_all : 0;  // rows of this block
  acc_t* D = scratch != nullptr ? scratch + r * (n_all * n_all + n_all) : ws + 3 * kWarp;
  acc_t* nrm = D + n * n;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t row0 = (s * B + b) * n;  // first row of (s, b) in the (S, B, n) row order of the outputs
  double* rs = row_stats + row0 * 3;
  acc_t* M = ortho_coef + row0 * n;
  acc_t* part = partials + r * 5;
  const int64_t y = target[b];
  if (!(y >= 0 && y < K)) {  // uniform over the block: no barrier below is reached by anyone
    for (int64_t q = tid; q < n * 3; q += nt) rs[q] = dev_nan<double>();
    for (int64_t q = tid; q < n * n; q += nt) M[q] = dev_nan<acc_t>();
    if (tid < 5) part[tid] = dev_nan<acc_t>();
    if (s == 0 && tid == 0) {  // sample_stats do not depend on y, but nobody may read them for a NaN sample
      for (int q = 0; q < 3; ++q) sample_stats[b * 3 + q] = dev_nan<double>();
    }
    return;
  }
  const acc_t invT = acc_t(p.inv_t), T2 = acc_t(p.t2);
  const bool unit_T = p.unit_t;
  const acc_t ls = acc_t(p.label_smoothing), lsK = acc_t(p.ls_k);
  const side_t* xs = zs + b * K;
  const side_t* xt = zt + b * K;

  // Student row: max, then sum exp((z_s - max) / T) (and, for s == 0, at T = 1 and the plain sum).
  acc_t mloc = -INFINITY;
  for (int64_t k = tid; k < K; k += nt) mloc = max(mloc, acc_t(xs[k]));
  const acc_t ms = block_max(mloc, ws);
  acc_t st[3] = {0, 0, 0};
  for (int64_t k = tid; k < K; k += nt) {
    const acc_t d = acc_t(xs[k]) - ms;
    st[0] += dev_exp(d * invT);
    if (s == 0) {
      st[1] += dev_exp(d);
      st[2] += acc_t(xs[k]);
    }
  }
  block_sum<3>(st, ws);
  const acc_t log_zTs = dev_log(st[0]);

  acc_t ce_b = 0, kd_b = 0;
  if (s == 0) {  // uniform per block
    // Teacher row: KD = T^2 (sum_k P_t,k ((z_t,k - mt) - (z_s,k - ms)) / T - log Zt + log Zs).
    mloc = -INFINITY;
    for (int64_t k = tid; k < K; k += nt) mloc = max(mloc, acc_t(xt[k]));
    const acc_t mt = block_max(mloc, ws);
    acc_t tk[2] = {0, 0};
    for (int64_t k = tid; k < K; k += nt) {
      const acc_t dt = (acc_t(xt[k]) - mt) * invT;
      const acc_t e = dev_exp(dt);
      tk[0] += e;
      tk[1] += e * (dt - (acc_t(xs[k]) - ms) * invT);
    }
    block_sum<2>(tk, ws);
    const acc_t log_zTt = dev_log(tk[0]);
    const acc_t log_z1s = dev_log(st[1]);
    kd_b = T2 * (tk[1] / tk[0] - log_zTt + log_zTs);
    if (tid == 0) {
      ce_b = (ms + log_z1s) - (acc_t(1) - ls) * acc_t(xs[y]) - lsK * st[2];
      sample_stats[b * 3] = double(ms) + double(log_z1s);
      sample_stats[b * 3 + 1] = double(ms) * p.inv_t + double(log_zTs);
      sample_stats[b * 3 + 2] = double(mt) * p.inv_t + double(log_zTt);
    }
  }

  // Sub-logit rows: CE and KL terms, row_stats.
  const scalar_t* x0 = sub + row0 * K;
  acc_t sub_ce = 0, sub_kl = 0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* x = x0 + i * K;
    acc_t mi = -INFINITY, si = 0;
    for (int64_t k = tid; k < K; k += nt) {
      const acc_t v = acc_t(x[k]);
      mi = max(mi, v);
      si += v;
    }
    mi = block_max(mi, ws);
    si = block_sum1(si, ws);
    acc_t rr[3] = {0, 0, 0};  // sum exp(x - m), sum exp((x - m) / T), sum of the latter times (log P - log P_s + ...)
    for (int64_t k = tid; k < K; k += nt) {
      const acc_t d = acc_t(x[k]) - mi;
      const acc_t e1 = dev_exp(d);
      const acc_t dT = d * invT;
      const acc_t eT = unit_T ? e1 : dev_exp(dT);
      rr[0] += e1;
      rr[1] += eT;
      rr[2] += eT * (dT - (acc_t(xs[k]) - ms) * invT);
    }
    block_sum<3>(rr, ws);
    if (tid == 0) {
      const acc_t log_z1 = dev_log(rr[0]), log_zT = dev_log(rr[1]);
      const acc_t lse1 = mi + log_z1;
      const acc_t kl = rr[2] / rr[1] - log_zT + log_zTs;
      rs[i * 3] = double(mi) + double(log_z1);
      rs[i * 3 + 1] = double(mi) * p.inv_t + double(log_zT);
      rs[i * 3 + 2] = double(kl);
      sub_ce += lse1 - (acc_t(1) - ls) * acc_t(x[y]) - lsK * si;
      sub_kl += T2 * kl;
    }
  }

  // Orthogonality: Gram matrix of the (shifted, masked) rows, then the hinge and M, one row per thread.
  acc_t hinge2 = 0;
  if (n > 1) {
    const bool shifted = p.shift != 0.0;
    const acc_t shift = acc_t(p.shift), fill = acc_t(p.fill);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) {
        const scalar_t* xi = x0 + i * K;
        const scalar_t* xj = x0 + j * K;
        acc_t d = 0;
        if (shifted) {
          for (int64_t k = tid; k < K; k += nt) {
            const acc_t zk = shift * acc_t(xt[k]);
            d += (acc_t(xi[k]) - zk) * (acc_t(xj[k]) - zk);
          }
        } else {
          for (int64_t k = tid; k < K; k += nt) d += acc_t(xi[k]) * acc_t(xj[k]);
        }
        d = block_sum1(d, ws);
        if (tid == 0) {
          if (p.masked) {  // the target entry of both rows replaced by the fill value
            const acc_t zy = shifted ? shift * acc_t(xt[y]) : acc_t(0);
            d = (d - (acc_t(xi[y]) - zy) * (acc_t(xj[y]) - zy)) + fill * fill;
          }
          D[i * n + j] = d;
          D[j * n + i] = d;
        }
      }
    // The n x n tail spread over the block: thread t does rows t, t + nt, ... (norms, then the hinge row and
    // row i of M); the hinge sum is one block_sum (fixed order). D was written by thread 0: one barrier.
    __syncthreads();
    for (int64_t i = tid; i < n; i += nt) nrm[i] = sqrt(D[i * n + i]);
    __syncthreads();
    const acc_t eps = acc_t(p.ortho_eps), theta = acc_t(p.ortho_threshold);
    const acc_t c4 = acc_t(p.c4);
    for (int64_t i = tid; i < n; i += nt) {
      const acc_t ri = max(nrm[i], eps);
      acc_t diag = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (j == i) continue;
        const acc_t rj = max(nrm[j], eps);
        const acc_t G = D[i * n + j] / (ri * rj);
        const acc_t h = max(G - theta, acc_t(0));
        hinge2 += h * h;
        M[i * n + j] = c4 * h / (ri * rj);
        diag += h * G;
      }
      // d max(|v|, eps) / dv = v / |v| where |v| > eps, 0 at equality (the reference's minimum-norm subgradient).
      M[i * n + i] = nrm[i] > eps ? -c4 * diag / (ri * ri) : acc_t(0);
    }
    hinge2 = block_sum1(hinge2, ws);
  } else if (tid == 0 && n == 1) {
    M[0] = 0;
  }
  if (tid == 0) {
    part[0] = ce_b;
    part[1] = sub_ce;
    part[2] = kd_b;
    part[3] = sub_kl;
    part[4] = hinge2;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// n <= kLaneMaxRows: the one-pass forward. One block per (stage, sample), P = max(S, 1) blocks per sample.
constexpr int kLaneRows = 4;          // rows kept in registers (n = 1 has its own instantiation)
constexpr int kLaneMaxRows = 8;       // n = 5..8: the kLaneMaxRows instantiation (fp32 accumulation only)
constexpr int kLaneMaxRowsVec = 2;    // its elements per thread and row (4 spilled 260 bytes at 128 registers)
constexpr int kLaneMaxThreads = 256;
constexpr int kLaneValues = kWarp;    // values of one reduce-scatter (one per lane)

// Threads per one-pass block: about two vectors per thread and row over K, 64 to 256 threads.
inline int lane_threads(int64_t K, int vec) {
  const int64_t per = 2 * int64_t(vec);
  int t = 64;
  while (t < kLaneMaxThreads && int64_t(t) * per < K) t *= 2;
  return t;
}

// kVec consecutive elements from p (16-byte vectors when kVec * sizeof(T) >= 16 and p is aligned: the host
// picks kVec > 1 only for 16-byte aligned rows with K a multiple of kVec).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec >= 16 ? 16 : sizeof(T) * kVec) VecPack {
  T v[kVec];
};

template <int kVec, typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = acc_t(p[0]);
  } else {
    const VecPack<T, kVec> pk = *reinterpret_cast<const VecPack<T, kVec>*>(p);
#pragma unroll
    for (int c = 0; c < kVec; ++c) out[c] = acc_t(pk.v[c]);
  }
}

// Sum of 32 values over a warp, reduce-scatter style: after 5 halving steps lane l holds the warp total of the
// value with index l (31 shuffles instead of 32 x 5). Step kHalf: the live values are v[0, 2 kHalf); a lane
// with bit kHalf set keeps the upper half (into v[0, kHalf)) and sends the lower half to its partner, which
// does the opposite. Every index is a compile-time constant (template recursion), so v stays in registers.
// The order of every sum is fixed by the lane pattern: deterministic.
template <int kHalf, typename T>
__device__ __forceinline__ void reduce_scatter_step(T (&v)[kLaneValues], int lane) {
  if constexpr (kHalf >= 1) {
    const bool upper = (lane & kHalf) != 0;
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      const T send = upper ? v[j] : v[j + kHalf];
      const T keep = upper ? v[j + kHalf] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
    }
    reduce_scatter_step<kHalf / 2>(v, lane);
  }
}

template <typename T>
__device__ __forceinline__ T warp_reduce_scatter(T (&v)[kLaneValues]) {
  reduce_scatter_step<kLaneValues / 2>(v, int(threadIdx.x % kWarp));
  return v[0];
}

// The value index lane `lane` holds after warp_reduce_scatter: bit h of the lane chose the upper half at
// step h, so the index is the lane itself.
__device__ __forceinline__ int scatter_index(int lane) { return lane; }

// One-pass forward. Per thread, over its vectors of the K axis: for each of the rows (kRows in registers, n of
// them live) the online max m, sum exp(x - m), sum exp((x - m) / T), the KL numerator
// sum exp((x - m) / T) (x - z_s), the row sum, and the upper triangle of the Gram sum v_i v_j; for z_s / T its
// online (max, sum). Then ONE block reduction: a block max of the n + 1 maxima (one barrier), each thread's
// sums rescaled to it, reduce-scatters of the sums per warp, 32 at a time (one value per lane; kRows = 8: 69
// sums, 3 of them), one barrier, the per-warp partials added in warp order by thread t for value t. The n x n
// tail is spread over n threads (thread i: row i's statistics, CE, KL, and row i of M); the s = 0 block then
// reads z_s and z_t once more (L2) for CE, KD and sample_stats.
// Register budget (ptxas -v, sm_90, CUDA 13.0): with the thread count alone ptxas aimed at 64 or 128 registers
// and spilled in the fp64 instantiations (88-164 bytes) and the fp16 8-wide one (4 bytes). Declared here: at
// least 2 blocks of 256 threads per SM (<= 128 registers) for fp32 accumulation up to kLaneRows rows, 1 for fp64
// (146 registers at kRows = 4) and for kLaneMaxRows rows (~155 registers: the 36 Gram sums and 8 rows of state;
// at 128 it spilled 12-36 bytes); with the fp16 vectors 4 wide (below) no instantiation spills.
template <typename acc_t, int kRows>
constexpr int lane_min_blocks() {
  return sizeof(acc_t) == 8 || kRows > kLaneRows ? 1 : 2;
}

template <typename scalar_t, typename side_t, typename acc_t, int kRows, int kVec>
__global__ void __launch_bounds__(kLaneMaxThreads, lane_min_blocks<acc_t, kRows>())
    sub_logit_loss_fwd_kernel(const scalar_t* __restrict__ sub, const side_t* __restrict__ zs,
                              const side_t* __restrict__ zt, const int64_t* __restrict__ target,
                              double* __restrict__ row_stats, acc_t* __restrict__ ortho_coef,
                              double* __restrict__ sample_stats, acc_t* __restrict__ partials, int64_t S, int64_t B,
                              int64_t n_all, int64_t K, FwdParams p) {
  static_assert(kRows == 1 || kRows == kLaneRows || kRows == kLaneMaxRows, "kRows: 1, kLaneRows or kLaneMaxRows");
  constexpr int kGram = kRows > 1 ? kRows * (kRows + 1) / 2 : 0;
  constexpr int kSums = 4 * kRows + kGram + 1;  // s1, sT, w, sum per row; the Gram; the student's sum
  constexpr int kChunks = (kSums + kLaneValues - 1) / kLaneValues;  // reduce-scatters of 32 values (8 rows: 3)
  constexpr int kPacked = kChunks * kLaneValues;
  __shared__ acc_t red_max[kLaneMaxThreads / kWarp][kRows + 1];
  __shared__ acc_t red_sum[kLaneMaxThreads / kWarp][kPacked];
  __shared__ acc_t tot[kPacked + kRows + 1];  // the block's sums, then the maxima
  __shared__ acc_t ws[4 * kWarp];                 // block_sum<4> / block_max scratch of the s = 0 pass
  const unsigned P = S > 0 ? unsigned(S) : 1u;
  const int64_t r = blockIdx.x, b = int64_t(blockIdx.x / P), s = int64_t(blockIdx.x % P);
  const int64_t n = S > 0 ? n_all : 0;  // live rows of this block (S = 0: CE and KD only)
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid % kWarp, warp = tid / kWarp, warps = nt / kWarp;
  const int64_t row0 = (s * B + b) * n_all;
  double* rs = row_stats + row0 * 3;
  acc_t* M = ortho_coef + row0 * n_all;
  acc_t* part = partials + r * 5;
  const int64_t y = target[b];
  if (!(y >= 0 && y < K)) {  // uniform over the block: no barrier below is reached by anyone
    for (int64_t q = tid; q < n * 3; q += nt) rs[q] = dev_nan<double>();
    for (int64_t q = tid; q < n * n; q += nt) M[q] = dev_nan<acc_t>();
    if (tid < 5) part[tid] = dev_nan<acc_t>();
    if (s == 0 && tid == 0)
      for (int q = 0; q < 3; ++q) sample_stats[b * 3 + q] = dev_nan<double>();
    return;
  }
  const acc_t invT = acc_t(p.inv_t), T2 = acc_t(p.t2), ls = acc_t(p.label_smoothing), lsK = acc_t(p.ls_k);
  const bool unit_T = p.unit_t, shifted = p.shift != 0.0, masked = p.masked;
  const acc_t shift = acc_t(p.shift), fill = acc_t(p.fill);
  const side_t* xs = zs + b * K;
  const side_t* xt = zt + b * K;
  const scalar_t* x0 = sub + row0 * K;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  acc_t m[kRows], s1[kRows], sT[kRows], w[kRows], sx[kRows], g[kGram > 0 ? kGram : 1];
#pragma unroll
  for (int i = 0; i < kRows; ++i) m[i] = kNegInf, s1[i] = 0, sT[i] = 0, w[i] = 0, sx[i] = 0;
#pragma unroll
  for (int q = 0; q < (kGram > 0 ? kGram : 1); ++q) g[q] = 0;
  acc_t ms = kNegInf, ss = 0;  // z_s / T

  for (int64_t k0 = int64_t(tid) * kVec; k0 < K; k0 += int64_t(nt) * kVec) {
    // Every load of the step first (kRows + 1 or + 2 vectors in flight), then the arithmetic.
    acc_t x[kRows][kVec], vs[kVec], vt[kVec];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (i < n) load_vec<kVec>(x0 + i * K + k0, x[i]);
    load_vec<kVec>(xs + k0, vs);
    if (shifted && kGram > 0) load_vec<kVec>(xt + k0, vt);
    // student at T
    acc_t vmax = kNegInf;
#pragma unroll
    for (int c = 0; c < kVec; ++c) vmax = max(vmax, vs[c] * invT);
    if (vmax > ms) {
      ss *= dev_exp(ms - vmax);
      ms = vmax;
    }
#pragma unroll
    for (int c = 0; c < kVec; ++c) ss += dev_exp(vs[c] * invT - ms);
    // rows
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (i >= n) break;
      acc_t rmax = kNegInf;
#pragma unroll
      for (int c = 0; c < kVec; ++c) rmax = max(rmax, x[i][c]);
      // T = 1 (the default) takes one exp per element: two branches, uniform over the grid, rather than a
      // select the compiler could if-convert into computing both exps. At T = 1, sT is s1 (set after the loop).
      if (unit_T) {
        if (rmax > m[i]) {  // rescale to the new max (m = -inf: the sums are 0 and exp(-inf) = 0)
          const acc_t a1 = dev_exp(m[i] - rmax);
          s1[i] *= a1, w[i] *= a1;
          m[i] = rmax;
        }
#pragma unroll
        for (int c = 0; c < kVec; ++c) {
          const acc_t e1 = dev_exp(x[i][c] - m[i]);
          s1[i] += e1, w[i] += e1 * (x[i][c] - vs[c]), sx[i] += x[i][c];
        }
      } else {
        if (rmax > m[i]) {
          const acc_t a1 = dev_exp(m[i] - rmax), aT = dev_exp((m[i] - rmax) * invT);
          s1[i] *= a1, sT[i] *= aT, w[i] *= aT;
          m[i] = rmax;
        }
#pragma unroll
        for (int c = 0; c < kVec; ++c) {
          const acc_t d = x[i][c] - m[i];
          const acc_t e1 = dev_exp(d), eT = dev_exp(d * invT);
          s1[i] += e1, sT[i] += eT, w[i] += eT * (x[i][c] - vs[c]), sx[i] += x[i][c];
        }
      }
    }
    // Gram of the orthogonality rows v = x - shift z_t, fill at the target
    if constexpr (kGram > 0) {
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const bool at_y = masked && k0 + c == y;
        acc_t v[kRows];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          v[i] = i < n ? (shifted ? x[i][c] - shift * vt[c] : x[i][c]) : acc_t(0);
          if (at_y && i < n) v[i] = fill;
        }
        int q = 0;
#pragma unroll
        for (int i = 0; i < kRows; ++i)
#pragma unroll
          for (int j = i; j < kRows; ++j) g[q++] += v[i] * v[j];
      }
    }
  }

  if (unit_T)
#pragma unroll
    for (int i = 0; i < kRows; ++i) sT[i] = s1[i];
  // Block max of the row maxima and the student's (one barrier).
  acc_t mx[kRows + 1];
#pragma unroll
  for (int i = 0; i < kRows; ++i) mx[i] = warp_max(m[i]);
  mx[kRows] = warp_max(ms);
  if (lane == 0)
#pragma unroll
    for (int i = 0; i <= kRows; ++i) red_max[warp][i] = mx[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i <= kRows; ++i) {
    acc_t t = red_max[0][i];
    for (int q = 1; q < warps; ++q) t = max(t, red_max[q][i]);
    mx[i] = t;
  }
  // This thread's sums rescaled to the block maxima, packed; then the reduce-scatter and the warp partials.
  acc_t v[kPacked];
#pragma unroll
  for (int q = 0; q < kPacked; ++q) v[q] = 0;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const acc_t ref = mx[i] == kNegInf ? acc_t(0) : mx[i];
    const acc_t a1 = dev_exp(m[i] - ref), aT = unit_T ? a1 : dev_exp((m[i] - ref) * invT);
    v[4 * i] = s1[i] * a1, v[4 * i + 1] = sT[i] * aT, v[4 * i + 2] = w[i] * aT, v[4 * i + 3] = sx[i];
  }
#pragma unroll
  for (int q = 0; q < kGram; ++q) v[4 * kRows + q] = g[q];
  {
    const acc_t ref = mx[kRows] == kNegInf ? acc_t(0) : mx[kRows];
    v[kSums - 1] = ss * dev_exp(ms - ref);
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {  // chunk c: values [32 c, 32 c + 32), every index a constant
    acc_t chunk[kLaneValues];
#pragma unroll
    for (int q = 0; q < kLaneValues; ++q) chunk[q] = v[c * kLaneValues + q];
    red_sum[warp][c * kLaneValues + scatter_index(lane)] = warp_reduce_scatter(chunk);
  }
  __syncthreads();
  for (int q = tid; q < kPacked; q += nt) {  // value q: the warp partials in warp order
    acc_t t = red_sum[0][q];
    for (int wp = 1; wp < warps; ++wp) t += red_sum[wp][q];
    tot[q] = t;
  }
  if (tid == 0)
#pragma unroll
    for (int i = 0; i <= kRows; ++i) tot[kPacked + i] = mx[i];
  __syncthreads();

  // The tail: thread i < n does row i.
  const acc_t msT = tot[kPacked + kRows], log_ss = dev_log(tot[kSums - 1]);  // lse(z_s / T) = msT + log_ss
  acc_t ce_i = 0, kl_i = 0, hinge_i = 0;
  if (tid < n) {
    const int i = tid;
    const acc_t mi = tot[kPacked + i], S1 = tot[4 * i], ST = tot[4 * i + 1], W = tot[4 * i + 2];
    const acc_t SX = tot[4 * i + 3];
    const acc_t log_z1 = dev_log(S1), log_zT = dev_log(ST);
    const acc_t kl = W / ST * invT - (mi * invT - msT) - log_zT + log_ss;
    rs[i * 3] = double(mi) + double(log_z1);
    rs[i * 3 + 1] = double(mi) * p.inv_t + double(log_zT);
    rs[i * 3 + 2] = double(kl);
    ce_i = (mi + log_z1) - (acc_t(1) - ls) * acc_t(x0[i * K + y]) - lsK * SX;
    kl_i = T2 * kl;
    if constexpr (kGram > 0) {
      // Gram entry (i, j) of the packed upper triangle
      auto gram = [&](int a, int c) {
        const int lo = a < c ? a : c, hi = a < c ? c : a;
        return tot[4 * kRows + lo * kRows - lo * (lo - 1) / 2 + (hi - lo)];
      };
      const acc_t eps = acc_t(p.ortho_eps), theta = acc_t(p.ortho_threshold), c4 = acc_t(p.c4);
      const acc_t nrm_i = sqrt(gram(i, i)), ri = max(nrm_i, eps);
      acc_t diag = 0;
      for (int j = 0; j < n; ++j) {
        if (j == i) continue;
        const acc_t rj = max(sqrt(gram(j, j)), eps);
        const acc_t G = gram(i, j) / (ri * rj);
        const acc_t h = max(G - theta, acc_t(0));
        hinge_i += h * h;
        M[i * n + j] = c4 * h / (ri * rj);
        diag += h * G;
      }
      // d max(|v|, eps) / dv = v / |v| where |v| > eps, 0 at equality (the reference's minimum-norm subgradient).
      M[i * n + i] = nrm_i > eps ? -c4 * diag / (ri * ri) : acc_t(0);
    } else {
      M[0] = 0;
    }
  }
  // The rows' partials, summed over the n <= kRows lanes of warp 0 in a fixed order.
  if (warp == 0) {
#pragma unroll
    for (int o = 1; o < kRows; o *= 2) {
      ce_i += __shfl_xor_sync(0xffffffffu, ce_i, o);
      kl_i += __shfl_xor_sync(0xffffffffu, kl_i, o);
      hinge_i += __shfl_xor_sync(0xffffffffu, hinge_i, o);
    }
  }

  acc_t ce_b = 0, kd_b = 0;
  if (s == 0) {  // uniform per block: CE of z_s, KD, sample_stats
    acc_t mloc = kNegInf, tloc = kNegInf;
    for (int64_t k = tid; k < K; k += nt) mloc = max(mloc, acc_t(xs[k])), tloc = max(tloc, acc_t(xt[k]));
    const acc_t m1s = block_max(mloc, ws);
    const acc_t mt = block_max(tloc, ws);
    acc_t q[4] = {0, 0, 0, 0};  // sum exp(z_s - m1s), sum z_s, sum exp((z_t - mt) / T), its KD numerator
    for (int64_t k = tid; k < K; k += nt) {
      const acc_t a = acc_t(xs[k]), c = acc_t(xt[k]);
      const acc_t dt = (c - mt) * invT, e = dev_exp(dt);
      q[0] += dev_exp(a - m1s), q[1] += a, q[2] += e, q[3] += e * (dt - (a - m1s) * invT);
    }
    block_sum<4>(q, ws);
    const acc_t log_z1s = dev_log(q[0]), log_zTt = dev_log(q[2]);
    // KD = T^2 (E_Pt[(z_t - mt) / T - (z_s - m1s) / T] - log Z_t + lse(z_s / T) - m1s / T)
    kd_b = T2 * (q[3] / q[2] - log_zTt + (msT - m1s * invT) + log_ss);
    if (tid == 0) {
      ce_b = (m1s + log_z1s) - (acc_t(1) - ls) * acc_t(xs[y]) - lsK * q[1];
      sample_stats[b * 3] = double(m1s) + double(log_z1s);
      sample_stats[b * 3 + 1] = double(msT) + double(log_ss);
      sample_stats[b * 3 + 2] = double(mt) * p.inv_t + double(log_zTt);
    }
  }
  if (tid == 0) {
    part[0] = ce_b;
    part[1] = ce_i;
    part[2] = kd_b;
    part[3] = kl_i;
    part[4] = hinge_i;
  }
}

// The (R, 5) partials summed in a fixed order (strided per thread, then the deterministic block_sum).
template <typename acc_t>
__global__ void sub_logit_loss_reduce_kernel(const acc_t* __restrict__ partials, acc_t* __restrict__ loss,
                                  acc_t* __restrict__ parts, int64_t R, int64_t B, int64_t n, double w_gt,
                                  double w_kd, double w_kl, double w_ol) {
  __shared__ acc_t ws[5 * kWarp];
  acc_t v[5] = {0, 0, 0, 0, 0};
  for (int64_t q = threadIdx.x; q < R; q += blockDim.x)
#pragma unroll
    for (int j = 0; j < 5; ++j) v[j] += partials[q * 5 + j];
  block_sum<5>(v, ws);
  if (threadIdx.x == 0) {
    const acc_t rows = acc_t(B) * acc_t(n);
    // n == 1: the hinge sums are 0, or NaN for an out-of-range target (which must reach the part).
    const acc_t pv[5] = {v[0] / acc_t(B), v[1] / rows, v[2] / acc_t(B), v[3] / rows,
                         n > 1 ? v[4] / (rows * acc_t(n - 1)) : v[4]};
    for (int j = 0; j < 5; ++j) parts[j] = pv[j];
    *loss = acc_t(w_gt) * (pv[0] + pv[1]) + acc_t(w_kd) * pv[2] + acc_t(w_kl) * pv[3] + acc_t(w_ol) * pv[4];
  }
}

// Columns per thread in the backward, and n up to which the n values of a column of (s, b) are kept in
// registers: 2 x 8 fits the float kernels in 128 registers without spills (4 x 8 spilled under ptxas 13.0).
constexpr int kPerThread = 2;
constexpr int kRegRows = 8;
constexpr int kBwdMaxThreads = 256;

// Threads per backward block: a block covers kPerThread * threads columns (K = 1000: 4 blocks per sample).
inline int bwd_threads(int64_t K) {
  if (K <= 128) return 64;
  if (K <= 1024) return 128;
  return kBwdMaxThreads;
}

// Grid (B, ceil(K / (kPerThread * blockDim.x))). Thread columns k_c = k0 + c * blockDim.x (coalesced per c).
// (.., 2): up to 128 registers; with the thread count alone ptxas aimed at 128 and spilled 4 bytes in fp64.
template <typename scalar_t, typename side_t, typename acc_t>
__global__ void __launch_bounds__(kBwdMaxThreads, 2)
    sub_logit_loss_bwd_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ sub,
                   const side_t* __restrict__ zs, const side_t* __restrict__ zt, const int64_t* __restrict__ target,
                   const double* __restrict__ row_stats, const acc_t* __restrict__ ortho_coef,
                   const double* __restrict__ sample_stats, scalar_t* __restrict__ gsub, side_t* __restrict__ gzs,
                   int64_t S, int64_t B, int64_t n, int64_t K, BwdParams p) {
  const int64_t b = blockIdx.x;
  const int64_t k0 = int64_t(blockIdx.y) * kPerThread * blockDim.x + threadIdx.x;
  const int64_t y = target[b];
  const bool need_sub = gsub != nullptr, need_zs = gzs != nullptr;
  int64_t kc[kPerThread];
  bool in[kPerThread];
#pragma unroll
  for (int c = 0; c < kPerThread; ++c) {
    kc[c] = k0 + int64_t(c) * blockDim.x;
    in[c] = kc[c] < K;
  }
  if (!(y >= 0 && y < K)) {
    const acc_t nanv = dev_nan<acc_t>();
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) {
      if (!in[c]) continue;
      if (need_zs) gzs[b * K + kc[c]] = side_t(nanv);
      if (need_sub)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t i = 0; i < n; ++i) gsub[((s * B + b) * n + i) * K + kc[c]] = scalar_t(nanv);
    }
    return;
  }
  const acc_t g = *grad_loss;
  const acc_t invT = acc_t(p.inv_t), lsK = acc_t(p.ls_k), one_ls = acc_t(p.one_ls);
  const acc_t a_ce = acc_t(p.a_ce), a_kd = acc_t(p.a_kd), a_sce = acc_t(p.a_sce), a_skl = acc_t(p.a_skl);
  const acc_t a_x = acc_t(p.a_x), cq = acc_t(p.cq), shift = acc_t(p.shift);
  acc_t h1s, l1s, hTs, lTs, hTt, lTt;  // hi/lo of the sample statistics
  split_stat(sample_stats[b * 3], h1s, l1s);
  split_stat(sample_stats[b * 3 + 1], hTs, lTs);
  split_stat(sample_stats[b * 3 + 2], hTt, lTt);

  acc_t vt[kPerThread], lPs[kPerThread], dzs[kPerThread];
#pragma unroll
  for (int c = 0; c < kPerThread; ++c) {
    const int64_t k = in[c] ? kc[c] : 0;  // out-of-range columns compute on column 0 and store nothing
    const acc_t vs = acc_t(zs[b * K + k]);
    vt[c] = acc_t(zt[b * K + k]);
    lPs[c] = (vs * invT - hTs) - lTs;  // log P_s
    const acc_t ps = dev_exp((vs - h1s) - l1s), Ps = dev_exp(lPs[c]), Pt = dev_exp((vt[c] * invT - hTt) - lTt);
    dzs[c] = a_ce * (ps - lsK - (k == y ? one_ls : acc_t(0))) + cq * Ps - a_kd * Pt;
  }

  // One dzf element: x its value, orth its orthogonality term; updates the dz_s accumulator.
  // (h1, l1), (hT, lT): hi/lo of the row's lse(x) and lse(x / T).
  auto element = [&](int64_t row, acc_t x, acc_t orth, int c, acc_t h1, acc_t l1, acc_t hT, acc_t lT, acc_t kl) {
    const int64_t k = kc[c];
    const acc_t lP = (x * invT - hT) - lT;
    const acc_t P = dev_exp(lP);
    dzs[c] -= a_skl * P;
    if (need_sub && in[c]) {
      const acc_t pk = dev_exp((x - h1) - l1);
      const acc_t d = a_sce * (pk - lsK - (k == y ? one_ls : acc_t(0))) + a_x * P * (lP - lPs[c] - kl) + orth;
      gsub[row * K + k] = scalar_t(g * d);
    }
  };

  const bool ortho = need_sub && n > 1;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row0 = (s * B + b) * n;
    const double* rs = row_stats + row0 * 3;
    const acc_t* M = ortho_coef + row0 * n;
    if (n <= kRegRows) {
      acc_t xr[kRegRows][kPerThread];
#pragma unroll
      for (int j = 0; j < kRegRows; ++j)
#pragma unroll
        for (int c = 0; c < kPerThread; ++c)
          xr[j][c] = (j < n) ? acc_t(sub[(row0 + j) * K + (in[c] ? kc[c] : 0)]) : acc_t(0);
#pragma unroll
      for (int i = 0; i < kRegRows; ++i) {
        if (i >= n) break;
        acc_t h1, l1, hT, lT;
        split_stat(rs[i * 3], h1, l1);
        split_stat(rs[i * 3 + 1], hT, lT);
        const acc_t kl = acc_t(rs[i * 3 + 2]);
#pragma unroll
        for (int c = 0; c < kPerThread; ++c) {
          acc_t orth = 0;
          if (ortho && !(p.masked && kc[c] == y)) {
#pragma unroll
            for (int j = 0; j < kRegRows; ++j)
              if (j < n) orth += M[i * n + j] * (xr[j][c] - shift * vt[c]);
          }
          element(row0 + i, xr[i][c], orth, c, h1, l1, hT, lT, kl);
        }
      }
    } else {  // large n: the other rows' values are re-read (L1/L2 hits: this thread just read them)
      for (int64_t i = 0; i < n; ++i) {
        acc_t h1, l1, hT, lT;
        split_stat(rs[i * 3], h1, l1);
        split_stat(rs[i * 3 + 1], hT, lT);
        const acc_t kl = acc_t(rs[i * 3 + 2]);
#pragma unroll
        for (int c = 0; c < kPerThread; ++c) {
          const int64_t k = in[c] ? kc[c] : 0;
          acc_t orth = 0;
          if (ortho && !(p.masked && kc[c] == y))
            for (int64_t j = 0; j < n; ++j) orth += M[i * n + j] * (acc_t(sub[(row0 + j) * K + k]) - shift * vt[c]);
          element(row0 + i, acc_t(sub[(row0 + i) * K + k]), orth, c, h1, l1, hT, lT, kl);
        }
      }
    }
  }
  if (need_zs) {
#pragma unroll
    for (int c = 0; c < kPerThread; ++c)
      if (in[c]) gzs[b * K + kc[c]] = side_t(g * dzs[c]);
  }
}

// The storage a kernel reads for a side input (z_s, z_t): its own dtype when it is zf's, else acc (fp32/fp64).
at::ScalarType side_dtype(at::ScalarType zf, at::ScalarType zs, at::ScalarType zt, at::ScalarType acc) {
  return (zs == zf && zt == zf) ? zf : acc;
}

// Dispatch over (zf storage, side storage) with side in {zf, acc}: fp32/fp32, fp64/fp64, bf16/bf16, bf16/fp32,
// fp16/fp16, fp16/fp32.
template <typename F>
void dispatch_sub_logit_loss(at::ScalarType zf, at::ScalarType side, F&& f) {
  using BF = at::BFloat16;
  using H = at::Half;
  if (zf == at::kFloat) f(float{}, float{});
  else if (zf == at::kDouble) f(double{}, double{});
  else if (zf == at::kBFloat16 && side == at::kBFloat16) f(BF{}, BF{});
  else if (zf == at::kBFloat16) f(BF{}, float{});
  else if (zf == at::kHalf && side == at::kHalf) f(H{}, H{});
  else if (zf == at::kHalf) f(H{}, float{});
  else TORCH_CHECK(false, "sub_logit_loss (cuda): unsupported dtype ", zf);
}

// The storage dtype of zf for the compute dtype: its own for fp32 compute (fp32/bf16/fp16), fp64 for fp64.
at::ScalarType zf_dtype(at::ScalarType zf, at::ScalarType acc) {
  if (acc == at::kDouble) return at::kDouble;
  return (zf == at::kFloat || zf == at::kBFloat16 || zf == at::kHalf) ? zf : at::kFloat;
}

void check_inputs(const Tensor& sub, const Tensor& zs, const Tensor& zt, const Tensor& y) {
  TORCH_CHECK(sub.is_cuda() && sub.dim() == 4, "sub_logit_loss: expected a CUDA (S, B, n, K) sub_logits tensor");
  const int64_t B = sub.size(1), K = sub.size(3);
  TORCH_CHECK(zs.dim() == 2 && zs.size(0) == B && zs.size(1) == K && zt.sizes() == zs.sizes() && y.dim() == 1 &&
                  y.size(0) == B,
              "sub_logit_loss: inconsistent shapes: sub_logits ", sub.sizes(), ", student_logits ", zs.sizes(),
              ", teacher_logits ", zt.sizes(), ", target ", y.sizes());
  TORCH_CHECK(zs.device() == sub.device() && zt.device() == sub.device() && y.device() == sub.device(),
              "sub_logit_loss: all tensors must be on ", sub.device());
}

}  // namespace

SubLogitLossOut sub_logit_loss(HCD_SUB_LOGIT_LOSS_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(sub_logits, student_logits, teacher_logits, target);
  const c10::cuda::CUDAGuard guard(sub_logits.device());
  const auto acc = compute_dtype({sub_logits.scalar_type(), student_logits.scalar_type(),
                                  teacher_logits.scalar_type()});
  const auto zf_st = zf_dtype(sub_logits.scalar_type(), acc);
  const auto side_st = side_dtype(zf_st, student_logits.scalar_type(), teacher_logits.scalar_type(), acc);
  const Tensor sub = sub_logits.to(zf_st).contiguous();
  const Tensor zs = student_logits.to(side_st).contiguous();
  const Tensor zt = teacher_logits.to(side_st).contiguous();
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t S = sub.size(0), B = sub.size(1), n = sub.size(2), K = sub.size(3);
  const auto opts = sub.options().dtype(acc);
  Tensor row_stats = at::empty({S, B, n, 3}, opts.dtype(at::kDouble));  // fp64 statistics (the op's contract)
  Tensor ortho_coef = at::empty({S, B, n, n}, opts);
  Tensor sample_stats = at::empty({B, 3}, opts.dtype(at::kDouble));
  Tensor parts = at::empty({5}, opts);
  Tensor loss = at::empty({}, opts);
  if (B * K == 0) {  // nothing to launch; the means over an empty batch are NaN, as in the reference
    parts.fill_(std::numeric_limits<double>::quiet_NaN());
    loss.fill_(std::numeric_limits<double>::quiet_NaN());
    return {loss, parts, row_stats, ortho_coef, sample_stats};
  }
  const int64_t P = std::max<int64_t>(S, 1);  // blocks per sample (S = 0: one, for CE and KD)
  Tensor partials = at::empty({P * B, 5}, opts);
  FwdParams p{};
  p.inv_t = 1.0 / temperature, p.t2 = temperature * temperature, p.unit_t = temperature == 1.0;
  p.label_smoothing = label_smoothing, p.ls_k = label_smoothing / double(K);
  p.ortho_threshold = ortho_threshold, p.ortho_eps = ortho_eps, p.fill = mask_fill, p.shift = ortho_shift;
  p.c4 = n > 1 ? 4.0 * w_ol / (double(B) * double(n) * double(n - 1)) : 0.0;  // 4 w_ol / (B n (n-1))
  p.masked = mask_target;
  TORCH_CHECK(P * B <= int64_t(INT32_MAX), "sub_logit_loss (cuda): S * B too large for one launch");
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_sub_logit_loss(zf_st, side_st, [&](auto zf_tag, auto side_tag) {
    using scalar_t = decltype(zf_tag);
    using side_t = decltype(side_tag);
    using acc_t = at::opmath_type<scalar_t>;
    if (n <= kLaneRows || (sizeof(acc_t) == 4 && n <= kLaneMaxRows)) {
      // 16-byte vectors of zf where every row is 16-byte aligned: K a multiple of the vector, aligned bases
      // (the side rows then start on 16 bytes too: K * sizeof(side_t) is a multiple of 16).
      // fp64: scalar (the fp64 state already takes twice the registers); 16-bit zf with fp32 sides: 8-byte zf
      // vectors, 16-byte side vectors (8 elements spilled at 128 registers under ptxas 13); fp16 throughout:
      // 8-byte vectors (8 wide spilled 4 bytes at 128 registers, their fp16 -> fp32 unpacking); bf16: 16 bytes.
      constexpr int kVec = sizeof(scalar_t) == 8                                ? 1
                           : sizeof(side_t) > sizeof(scalar_t)                  ? 4
                           : std::is_same_v<scalar_t, at::Half>                 ? 4
                                                                                : 16 / sizeof(scalar_t);
      const bool aligned = kVec > 1 && K % kVec == 0 && reinterpret_cast<uintptr_t>(sub.data_ptr()) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(zs.data_ptr()) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(zt.data_ptr()) % 16 == 0;
      int threads = lane_threads(K, aligned ? kVec : 1);
      auto launch = [&](auto kernel) {
        kernel<<<unsigned(P * B), threads, 0, stream>>>(
            sub.data_ptr<scalar_t>(), zs.data_ptr<side_t>(), zt.data_ptr<side_t>(), y.data_ptr<int64_t>(),
            row_stats.data_ptr<double>(), ortho_coef.data_ptr<acc_t>(), sample_stats.data_ptr<double>(),
            partials.data_ptr<acc_t>(), S, B, n, K, p);
      };
      if (n == 1) {
        aligned ? launch(sub_logit_loss_fwd_kernel<scalar_t, side_t, acc_t, 1, kVec>)
                : launch(sub_logit_loss_fwd_kernel<scalar_t, side_t, acc_t, 1, 1>);
      } else if (n <= kLaneRows) {
        aligned ? launch(sub_logit_loss_fwd_kernel<scalar_t, side_t, acc_t, kLaneRows, kVec>)
                : launch(sub_logit_loss_fwd_kernel<scalar_t, side_t, acc_t, kLaneRows, 1>);
      } else if constexpr (sizeof(acc_t) == 4) {
        constexpr int kVec8 = kVec < kLaneMaxRowsVec ? kVec : kLaneMaxRowsVec;
        const bool aligned8 = aligned || (kVec8 > 1 && K % kVec8 == 0 &&
                                          reinterpret_cast<uintptr_t>(sub.data_ptr()) % 16 == 0 &&
                                          reinterpret_cast<uintptr_t>(zs.data_ptr()) % 16 == 0 &&
                                          reinterpret_cast<uintptr_t>(zt.data_ptr()) % 16 == 0);
        threads = lane_threads(K, aligned8 ? kVec8 : 1);
        aligned8 ? launch(sub_logit_loss_fwd_kernel<scalar_t, side_t, acc_t, kLaneMaxRows, kVec8>)
                 : launch(sub_logit_loss_fwd_kernel<scalar_t, side_t, acc_t, kLaneMaxRows, 1>);
      }
    } else {
      // D (n x n) and the norms in shared memory up to the default 48 KB, else in a global slice per block.
      const size_t per_block = size_t(n * n + n) * sizeof(acc_t);
      size_t smem = 3 * kWarp * sizeof(acc_t) + per_block;
      Tensor scratch;
      if (smem > 48 * 1024) {
        scratch = at::empty({P * B, n * n + n}, opts);
        smem = 3 * kWarp * sizeof(acc_t);
      }
      sub_logit_loss_fwd_large_n_kernel<scalar_t, side_t, acc_t><<<unsigned(P * B), row_threads(K), smem, stream>>>(
          sub.data_ptr<scalar_t>(), zs.data_ptr<side_t>(), zt.data_ptr<side_t>(), y.data_ptr<int64_t>(),
          row_stats.data_ptr<double>(), ortho_coef.data_ptr<acc_t>(), sample_stats.data_ptr<double>(),
          partials.data_ptr<acc_t>(), scratch.defined() ? scratch.data_ptr<acc_t>() : nullptr, S, B, n, K, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sub_logit_loss_reduce_kernel<acc_t><<<1, 256, 0, stream>>>(partials.data_ptr<acc_t>(), loss.data_ptr<acc_t>(),
                                                    parts.data_ptr<acc_t>(), P * B, B, n, w_gt, w_kd, w_kl, w_ol);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, parts, row_stats, ortho_coef, sample_stats};
}

SubLogitLossBwdOut sub_logit_loss_backward(HCD_SUB_LOGIT_LOSS_BWD_ARGS) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(sub_logits, student_logits, teacher_logits, target);
  const c10::cuda::CUDAGuard guard(sub_logits.device());
  const auto acc = compute_dtype({sub_logits.scalar_type(), student_logits.scalar_type(),
                                  teacher_logits.scalar_type()});
  const auto zf_st = zf_dtype(sub_logits.scalar_type(), acc);
  const auto side_st = side_dtype(zf_st, student_logits.scalar_type(), teacher_logits.scalar_type(), acc);
  const Tensor sub = sub_logits.to(zf_st).contiguous();
  const Tensor zs = student_logits.to(side_st).contiguous();
  const Tensor zt = teacher_logits.to(side_st).contiguous();
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t S = sub.size(0), B = sub.size(1), n = sub.size(2), K = sub.size(3);
  TORCH_CHECK(grad_loss.numel() == 1, "sub_logit_loss_backward: grad_loss must have one element");
  TORCH_CHECK(row_stats.numel() == S * B * n * 3 && ortho_coef.numel() == S * B * n * n &&
                  sample_stats.numel() == B * 3,
              "sub_logit_loss_backward: statistics do not match sub_logits ", sub.sizes());
  const Tensor gl = grad_loss.to(acc).contiguous();  // stays on the device: read by the kernel
  const Tensor rs = row_stats.to(at::kDouble).contiguous(), oc = ortho_coef.to(acc).contiguous();
  const Tensor ss = sample_stats.to(at::kDouble).contiguous();
  // The kernel writes dzf as zf_st and dz_s as side_st: the inputs' own dtypes except in the mixed cases.
  Tensor gsub = need_grad_sub ? at::empty(sub.sizes(), sub.options()) : at::empty({0}, sub_logits.options());
  Tensor gzs = need_grad_student ? at::empty(zs.sizes(), zs.options()) : at::empty({0}, student_logits.options());
  // S = 0 (or n = 0) still has the CE and KD gradient of z_s: the kernel runs whenever B K > 0, so no output
  // element is left as at::empty returned it.
  if (B * K > 0 && (need_grad_sub || need_grad_student)) {
    const int threads = bwd_threads(K);
    const int64_t kblocks = (K + int64_t(kPerThread) * threads - 1) / (int64_t(kPerThread) * threads);
    TORCH_CHECK(kblocks <= 65535 && B <= int64_t(INT32_MAX), "sub_logit_loss_backward: K or B too large");
    // The coefficients of the gradient formulas (header), formed once in fp64.
    BwdParams p{};
    const double Bn = double(B) * double(n);
    p.inv_t = 1.0 / temperature, p.ls_k = label_smoothing / double(K), p.one_ls = 1.0 - label_smoothing;
    p.a_ce = w_gt / double(B), p.a_kd = w_kd * temperature / double(B);
    p.a_sce = w_gt / Bn, p.a_skl = w_kl * temperature / Bn;
    p.a_x = detach_sub_targets ? 0.0 : p.a_skl;
    p.cq = p.a_kd + double(S) * double(n) * p.a_skl;
    p.shift = ortho_shift, p.masked = mask_target;
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_sub_logit_loss(zf_st, side_st, [&](auto zf_tag, auto side_tag) {
      using scalar_t = decltype(zf_tag);
      using side_t = decltype(side_tag);
      using acc_t = at::opmath_type<scalar_t>;
      sub_logit_loss_bwd_kernel<scalar_t, side_t, acc_t><<<dim3(unsigned(B), unsigned(kblocks)), threads, 0, stream>>>(
          gl.data_ptr<acc_t>(), sub.data_ptr<scalar_t>(), zs.data_ptr<side_t>(), zt.data_ptr<side_t>(),
          y.data_ptr<int64_t>(), rs.data_ptr<double>(), oc.data_ptr<acc_t>(), ss.data_ptr<double>(),
          need_grad_sub ? gsub.data_ptr<scalar_t>() : nullptr, need_grad_student ? gzs.data_ptr<side_t>() : nullptr,
          S, B, n, K, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Mixed dtypes only: one conversion to the input's dtype.
  if (need_grad_sub && gsub.scalar_type() != sub_logits.scalar_type()) gsub = gsub.to(sub_logits.scalar_type());
  if (need_grad_student && gzs.scalar_type() != student_logits.scalar_type())
    gzs = gzs.to(student_logits.scalar_type());
  return {gsub, gzs};
}

}  // namespace hcd_fast::cuda
