// Pointer-level CPU kernels of hcd_fast (no at::Tensor here) and the run-time choice between the
// portable build and the AVX2+FMA build of their vectorised bodies (see kernels_default.cpp and
// kernels_avx2.cpp, which compile the same *_kernel.h bodies under different CPU_CAPABILITY).
#pragma once
#include <cstdint>

namespace hcd_fast::cpu {

// Storage dtype of a tensor the sub-logit loss kernels read or write (they compute in T = float or double;
// rows of another dtype are converted through a small per-task buffer).
enum class Dtype : int8_t { Float, Double, BFloat16, Half };

// The fused sub-logit loss (hcd_fast/ops/sub_logit_loss.py, the design of issue 11). Every tensor is
// contiguous; sub_logits (S, B, n, K), student/teacher logits (B, K), target (B,) in [0, K) or not (a sample
// whose target is out of range gets NaN statistics, partials and gradient rows; nothing is read at it).
// The forward runs in two parallel phases: per sample (student and teacher rows) and per (stage, sample)
// (the n sub-logit rows), each writing its own slots; the host glue sums the partials in a fixed order.
template <typename T>
struct SubLogitLossFwdArgs {
  const void* sub_logits;
  const void* student_logits;
  const void* teacher_logits;
  Dtype sub_dtype, student_dtype, teacher_dtype;
  const int64_t* target;
  double* row_stats;   // (S, B, n, 3) in fp64: lse(zf_i), lse(zf_i / T), KL(P_zf_i || P_s) without the T^2
  T* ortho_coef;       // (S, B, n, n): M with d(w_ol * OL) / d v_i = sum_j M_ij v_j
  double* sample_stats;  // (B, 3) in fp64: lse(z_s), lse(z_s / T), lse(z_t / T)
  T* sample_aux;       // (B, 2): max z_s and log sum exp((z_s - max) / T), for log P_s without cancellation
  T* sample_partials;  // (B, 2): ce, kd (the T^2 KL) of each sample
  T* row_partials;     // (S * B, 3): sums over the n rows of (s, b) of sub-CE, T^2 KL, and hinge^2 over i != j
  int64_t S, B, n, K;
  double temperature, label_smoothing, ortho_threshold, ortho_eps;
  bool mask_target;    // the orthogonality rows have their target entry replaced by mask_fill
  double mask_fill;
  double ortho_shift;  // the orthogonality rows are v_i = zf_i - ortho_shift * z_t (0: the fused sub-logits)
  double w_ol;
};

// The backward of the fused sub-logit loss: recomputes the softmaxes from the inputs, reads grad_loss (0-d)
// and the forward's kl and ortho_coef, and writes each gradient element once in its tensor's dtype. Per
// sample b: the dzs row and the dzf rows (s, b, i) of every stage; grad_* null when not wanted.
template <typename T>
struct SubLogitLossBwdArgs {
  const T* grad_loss;  // 0-d
  const void* sub_logits;
  const void* student_logits;
  const void* teacher_logits;
  Dtype sub_dtype, student_dtype, teacher_dtype;
  const int64_t* target;
  const double* row_stats;  // (S, B, n, 3) from the forward (the kl column is used)
  const T* ortho_coef;  // (S, B, n, n)
  void* grad_sub_logits;      // (S, B, n, K) in grad_sub_dtype, or null
  void* grad_student_logits;  // (B, K) in grad_student_dtype, or null
  Dtype grad_sub_dtype, grad_student_dtype;
  int64_t S, B, n, K;
  double temperature, label_smoothing, ortho_shift;
  bool mask_target, detach_sub_targets;
  double w_gt, w_kd, w_kl;
};

// BN+ReLU+GAP over channels [c0, c1) of x (B, C, HW), contiguous in T.
template <typename T>
struct BnReluPoolArgs {
  const T* x;          // (B, C, HW)
  const T* weight;     // (C,)
  const T* bias;       // (C,)
  const T* mean;       // (C,) the normalising mean (batch mean in training, running mean in eval)
  const T* invstd;     // (C,) 1 / sqrt(var + eps)
  T* out;              // (B, C) forward output
  const T* grad_out;   // (B, C) backward only
  T* grad_x;           // (B, C, HW) backward only
  T* grad_weight;      // (C,) backward only
  T* grad_bias;        // (C,) backward only
  int64_t B, C, HW;
  bool training;
};

struct KernelTable {
  // Forward phase 1 over samples [begin, end), phase 2 over (stage, sample) rows r = s * B + b in [begin, end);
  // backward over samples [begin, end).
  void (*sub_logit_loss_samples_f)(const SubLogitLossFwdArgs<float>&, int64_t begin, int64_t end);
  void (*sub_logit_loss_samples_d)(const SubLogitLossFwdArgs<double>&, int64_t begin, int64_t end);
  void (*sub_logit_loss_rows_f)(const SubLogitLossFwdArgs<float>&, int64_t begin, int64_t end);
  void (*sub_logit_loss_rows_d)(const SubLogitLossFwdArgs<double>&, int64_t begin, int64_t end);
  void (*sub_logit_loss_bwd_f)(const SubLogitLossBwdArgs<float>&, int64_t begin, int64_t end);
  void (*sub_logit_loss_bwd_d)(const SubLogitLossBwdArgs<double>&, int64_t begin, int64_t end);
  // Per-channel batch mean and biased variance over (B, HW) for channels [c0, c1).
  void (*channel_moments_f)(const float* x, int64_t B, int64_t C, int64_t HW, float* mean, float* var,
                            int64_t c0, int64_t c1);
  void (*channel_moments_d)(const double* x, int64_t B, int64_t C, int64_t HW, double* mean, double* var,
                            int64_t c0, int64_t c1);
  void (*bn_relu_pool_fwd_f)(const BnReluPoolArgs<float>&, int64_t c0, int64_t c1);
  void (*bn_relu_pool_fwd_d)(const BnReluPoolArgs<double>&, int64_t c0, int64_t c1);
  void (*bn_relu_pool_bwd_f)(const BnReluPoolArgs<float>&, int64_t c0, int64_t c1);
  void (*bn_relu_pool_bwd_d)(const BnReluPoolArgs<double>&, int64_t c0, int64_t c1);
  // The same three for HW == 1, vectorised across channels; [c0, c1) must be whole kHw1Block blocks (the
  // last one may be short).
  void (*channel_moments_hw1_f)(const float* x, int64_t B, int64_t C, float* mean, float* var, int64_t c0,
                                int64_t c1);
  void (*channel_moments_hw1_d)(const double* x, int64_t B, int64_t C, double* mean, double* var, int64_t c0,
                                int64_t c1);
  void (*bn_relu_pool_fwd_hw1_f)(const BnReluPoolArgs<float>&, int64_t c0, int64_t c1);
  void (*bn_relu_pool_fwd_hw1_d)(const BnReluPoolArgs<double>&, int64_t c0, int64_t c1);
  void (*bn_relu_pool_bwd_hw1_f)(const BnReluPoolArgs<float>&, int64_t c0, int64_t c1);
  void (*bn_relu_pool_bwd_hw1_d)(const BnReluPoolArgs<double>&, int64_t c0, int64_t c1);
  const char* name;
};

// Channel block of the HW == 1 kernels: a multiple of every vector width used (8 floats / 4 doubles on AVX2).
constexpr int64_t kHw1Block = 16;

// Defined in kernels_default.cpp / kernels_avx2.cpp.
const KernelTable& kernels_default();
const KernelTable* kernels_avx2();  // null when not compiled in (non-x86 builds)

// The best table this CPU supports (AVX2+FMA when present, else the portable one).
const KernelTable& kernels();

}  // namespace hcd_fast::cpu
