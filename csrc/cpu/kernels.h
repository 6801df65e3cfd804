// Pointer-level CPU kernels of hcd_fast (no at::Tensor here) and the run-time choice between the
// portable build and the AVX2+FMA build of their vectorised bodies (see kernels_default.cpp and
// kernels_avx2.cpp, which compile the same *_kernel.h bodies under different CPU_CAPABILITY).
#pragma once
#include <cstdint>

namespace hcd_fast::cpu {

// Arguments of the fused sub-logit loss for samples [begin, end). T is the compute type (float/double);
// all tensors are contiguous in T. grad_* are null when no gradient is wanted.
template <typename T>
struct SubLogitLossArgs {
  const T* sub_logits;      // (S, B, n, K)
  const T* student_logits;  // (B, K)
  const T* teacher_logits;  // (B, K)
  const int64_t* target;    // (B,)
  T* grad_sub_logits;       // (S, B, n, K) d loss / d sub_logits, or null
  T* grad_student_logits;   // (B, K) d loss / d student_logits, or null
  T* partials;              // (B, 5): per-sample sums of ce, sub_ce, kd, sub_kl, ortho hinge^2
  int64_t S, B, n, K;
  double temperature, label_smoothing, ortho_threshold, ortho_eps;
  bool mask_target;    // the orthogonality rows have their target entry replaced by mask_fill
  double mask_fill;
  double ortho_shift;  // the orthogonality rows are v_i = zf_i - ortho_shift * z_t (0: the fused sub-logits)
  bool detach_sub_targets;
  double w_gt, w_kd, w_kl, w_ol;
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
  void (*sub_logit_loss_f)(const SubLogitLossArgs<float>&, int64_t begin, int64_t end);
  void (*sub_logit_loss_d)(const SubLogitLossArgs<double>&, int64_t begin, int64_t end);
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
