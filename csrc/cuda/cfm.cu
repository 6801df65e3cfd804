// CUDA cfm: the Complementary Feature Mapper with cuBLAS/cuBLASLt (tensor cores for bf16/fp16):
//   u      = [h ; f_t]                         (B, D + Dt) in the GEMM dtype g (one small copy)
//   hidden = relu(u W1^T + b1)                 one cuBLASLt GEMM with the RELU_BIAS epilogue, written in g
//                                              (fp32/fp64 g, or no cuBLASLt algorithm: GEMM + epilogue kernel)
//   z      = hidden W2^T                       GEMM with an fp32 output (fp64 for fp64 g); z = u W1^T without W2
//   zf     = lambda_s (z + b2) + lambda_t z_t  epilogue kernel, broadcast over the n sub-logits, rounded once
// The GEMM dtype g is the activation dtype: student_feat's dtype when it is bf16/fp16, else the compute dtype
// (fp32, or fp64 with any fp64 input). It is the rule of the backward (hcd_fast/ops/cpp_ops.py), so forward and
// backward run the same GEMMs: under autocast with fp32 weights and bf16 features, bf16 x bf16 tensor-core
// GEMMs with fp32 accumulation (W1, W2, f_t and b1 rounded to bf16, as F.linear does under autocast), not an
// fp32 SGEMM. What the op takes and returns is unchanged: zf and hidden in the promoted input dtype (hidden is
// the g-rounded ReLU output the second GEMM read).
#include <ATen/cuda/Exceptions.h>
#include <cublasLt.h>
#include <cublas_v2.h>

#include <memory>

#include "cuda/common.cuh"
#include "ops.h"

namespace hcd_fast::cuda {
namespace {

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kDouble: return CUDA_R_64F;
    default: TORCH_CHECK(false, "cfm (cuda): unsupported dtype ", t);
  }
}

void check_int_dims(std::initializer_list<int64_t> dims) {
  for (const int64_t d : dims) TORCH_CHECK(d <= int64_t(INT_MAX), "cfm (cuda): dimension ", d, " exceeds int32");
}

// Row-major out (rows x cols, fp32/fp64) = in (rows x k) @ W^T for row-major W (cols x k), both contiguous:
// in cuBLAS's column-major view, out^T (cols x rows) = op_T(W^T) (cols x k) * in^T (k x rows).
void gemm_rows(const Tensor& in, const Tensor& W, Tensor& out) {
  const int64_t rows = in.size(0), cols = W.size(0), k = W.size(1);
  TORCH_CHECK(in.is_contiguous() && W.is_contiguous() && out.is_contiguous() && in.size(1) == k &&
                  out.size(0) == rows && out.size(1) == cols,
              "cfm (cuda): gemm_rows shape mismatch");
  check_int_dims({rows, cols, k});
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const bool fp64 = out.scalar_type() == at::kDouble;
  const float alpha_f = 1.f, beta_f = 0.f;
  const double alpha_d = 1.0, beta_d = 0.0;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, int(cols), int(rows), int(k),
      fp64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f),
      W.data_ptr(), cuda_dtype(W.scalar_type()), int(k),
      in.data_ptr(), cuda_dtype(in.scalar_type()), int(k),
      fp64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f),
      out.data_ptr(), cuda_dtype(out.scalar_type()), int(cols),
      fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Largest power of two (<= 256) dividing the address: the alignment cuBLASLt may assume for the operand.
uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 1;
  while (al < 256 && a % (2 * al) == 0) al *= 2;
  return al;
}

template <typename T, cublasStatus_t (*Destroy)(T)>
struct LtHandle {  // owns one cuBLASLt descriptor
  T h = nullptr;
  ~LtHandle() {
    if (h != nullptr) Destroy(h);
  }
};

// out (rows x cols, row-major, dtype of u) = relu(u (rows x k) @ W^T + bias) with cuBLASLt's RELU_BIAS epilogue,
// for bf16/fp16 u, W (cols x k) and bias (cols) of that dtype, all contiguous. Column-major view (as gemm_rows):
// D = out^T (m = cols, n = rows, ld m) = op_T(A) * B with A = W stored (k x m, ld k), B = u stored (k x n, ld k);
// the bias (length m, D's rows) is broadcast over D's columns, i.e. added to every sample. Accumulation and the
// epilogue in fp32 (compute CUBLAS_COMPUTE_32F, scale fp32), split-K never reduces in the output type, and the
// result is rounded once to the output dtype. Returns false, launching nothing, when cuBLASLt offers no
// algorithm (or a degenerate size ATen also keeps off this path); the caller then takes gemm_rows + a kernel.
bool lt_linear_bias_relu(const Tensor& u, const Tensor& W, const Tensor& bias, Tensor& out) {
  const int64_t n = u.size(0), k = u.size(1), m = W.size(0);
  if (n < 2 || k < 2 || m < 2) return false;
  check_int_dims({n, k, m});
  const cudaDataType_t type = cuda_dtype(u.scalar_type());
  LtHandle<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> op;
  LtHandle<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> la, lb, ld;
  LtHandle<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> pref;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_RELU_BIAS;
  const void* bias_ptr = bias.data_ptr();
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&op.h, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  TORCH_CUDABLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&la.h, type, uint64_t(k), uint64_t(m), k));  // W as stored
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&lb.h, type, uint64_t(k), uint64_t(n), k));  // u as stored
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&ld.h, type, uint64_t(m), uint64_t(n), m));  // out^T
  size_t ws_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_MASK & ~uint32_t(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
  const uint32_t align_a = alignment_of(W.data_ptr()), align_b = alignment_of(u.data_ptr()),
                 align_d = alignment_of(out.data_ptr());
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                            &ws_size, sizeof(ws_size)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                            &reduction, sizeof(reduction)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                            &align_a, sizeof(align_a)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                            &align_b, sizeof(align_b)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                            &align_d, sizeof(align_d)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                            &align_d, sizeof(align_d)));
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, op.h, la.h, lb.h, ld.h, ld.h, pref.h, 1,
                                                               &heuristic, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0 || heuristic.state != CUBLAS_STATUS_SUCCESS) return false;
  const float alpha = 1.f, beta = 0.f;  // beta = 0: C (= D) is not read
  const cublasStatus_t run = cublasLtMatmul(handle, op.h, &alpha, W.data_ptr(), la.h, u.data_ptr(), lb.h, &beta,
                                            out.data_ptr(), ld.h, out.data_ptr(), ld.h, &heuristic.algo, ws,
                                            ws_size, at::cuda::getCurrentCUDAStream());
  // A configuration cuBLASLt refuses at launch leaves `out` unwritten: the caller's fallback recomputes all of it.
  if (run == CUBLAS_STATUS_NOT_SUPPORTED || run == CUBLAS_STATUS_INVALID_VALUE) return false;
  TORCH_CUDABLAS_CHECK(run);
  return true;
}

// hidden[b, j] = relu(a[b, j] + bias[j]) rounded to hidden's dtype; grid (B, ceil(H / blockDim.x)).
template <typename scalar_t, typename acc_t>
__global__ void bias_relu_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ bias,
                                 scalar_t* __restrict__ hidden, int64_t H) {
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x, i = int64_t(blockIdx.x) * H + j;
  if (j < H) hidden[i] = scalar_t(max(a[i] + bias[j], acc_t(0)));
}

// zf[b, s, k] = lambda_s (z[b, s K + k] + bias[s K + k]) + lambda_t zt[b, k]; grid (B, n, ceil(K / blockDim.x)).
// Arithmetic in fp64 when the output or z is fp64, else fp32.
template <typename scalar_t, typename z_t>
__global__ void fuse_teacher_kernel(const z_t* __restrict__ z,
                                    const std::conditional_t<std::is_same_v<scalar_t, double> ||
                                                                 std::is_same_v<z_t, double>, double, float>* __restrict__ bias,
                                    const scalar_t* __restrict__ zt, scalar_t* __restrict__ zf, int64_t nK,
                                    int64_t K, double lambda_s, double lambda_t) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<z_t, double>, double, float>;
  const int64_t k = int64_t(blockIdx.z) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t b = blockIdx.x, j = int64_t(blockIdx.y) * K + k, i = b * nK + j;
  zf[i] = scalar_t(acc_t(lambda_s) * (acc_t(z[i]) + bias[j]) + acc_t(lambda_t) * acc_t(zt[b * K + k]));
}

constexpr int kEpilogueThreads = 128;

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kEpilogueThreads - 1) / kEpilogueThreads;
  TORCH_CHECK(b <= 65535, "cfm (cuda): row of ", n, " elements too long");
  return unsigned(b);
}

}  // namespace

Tensor2 cfm(HCD_CFM_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(student_feat.is_cuda(), "cfm (cuda): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(student_feat.device());
  const auto out_dtype = at::promote_types(at::promote_types(student_feat.scalar_type(), teacher_feat.scalar_type()),
                                           at::promote_types(weight1.scalar_type(), teacher_logits.scalar_type()));
  const auto dt = compute_dtype({out_dtype});
  const auto act = student_feat.scalar_type();
  const bool low = act == at::kBFloat16 || act == at::kHalf;
  const auto g = low ? act : dt;                              // GEMM input dtype (see the header)
  const auto gacc = g == at::kDouble ? at::kDouble : at::kFloat;  // GEMM output dtype
  const int64_t B = student_feat.size(0), H = weight1.size(0), K = teacher_logits.size(1);
  const int64_t nK = num_sub_logits * K;
  const auto opts = student_feat.options();
  Tensor zf = at::empty({B, num_sub_logits, K}, opts.dtype(out_dtype));
  if (B == 0) return {zf, at::empty({0}, opts.dtype(out_dtype))};
  TORCH_CHECK(H > 0 && nK > 0, "cfm (cuda): empty hidden or output dimension");
  TORCH_CHECK(B <= int64_t(INT32_MAX) && num_sub_logits <= 65535, "cfm (cuda): batch or num_sub_logits too large");
  const Tensor u = at::cat({student_feat.to(g), teacher_feat.to(g)}, 1);  // (B, D + Dt), contiguous
  const Tensor w1 = weight1.to(g).contiguous();
  const Tensor zt = teacher_logits.to(out_dtype).contiguous();
  const bool has_hidden = weight2.has_value() && weight2->defined();
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor hidden = at::empty({0}, opts.dtype(out_dtype));
  Tensor z, out_bias;
  if (has_hidden) {
    const Tensor b1 = bias1.to(g).contiguous();  // rounded to g on both paths below
    Tensor hid = at::empty({B, H}, opts.dtype(g));
    if (!(low && lt_linear_bias_relu(u, w1, b1, hid))) {
      Tensor a = at::empty({B, H}, opts.dtype(gacc));
      gemm_rows(u, w1, a);
      const Tensor b1a = b1.to(gacc);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g, "hcd_fast_cfm_bias_relu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const dim3 grid(unsigned(B), blocks_for(H));
        bias_relu_kernel<scalar_t, acc_t><<<grid, kEpilogueThreads, 0, stream>>>(
            a.data_ptr<acc_t>(), b1a.data_ptr<acc_t>(), hid.data_ptr<scalar_t>(), H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    z = at::empty({B, nK}, opts.dtype(gacc));
    gemm_rows(hid, weight2->to(g).contiguous(), z);
    out_bias = *bias2;
    hidden = hid.to(out_dtype);
  } else {
    z = at::empty({B, H}, opts.dtype(gacc));
    gemm_rows(u, w1, z);
    out_bias = bias1;
  }
  const bool fp64_math = out_dtype == at::kDouble || gacc == at::kDouble;
  const Tensor bias_acc = out_bias.to(fp64_math ? at::kDouble : at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "hcd_fast_cfm", [&] {
    const dim3 grid(unsigned(B), unsigned(num_sub_logits), blocks_for(K));
    auto launch = [&](auto zero) {
      using z_t = decltype(zero);
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<z_t, double>, double, float>;
      fuse_teacher_kernel<scalar_t, z_t><<<grid, kEpilogueThreads, 0, stream>>>(
          z.data_ptr<z_t>(), bias_acc.data_ptr<acc_t>(), zt.data_ptr<scalar_t>(), zf.data_ptr<scalar_t>(), nK, K,
          lambda_student, lambda_teacher);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (gacc == at::kDouble)
      launch(double(0));
    else
      launch(float(0));
  });
  return {zf, hidden};
}

}  // namespace hcd_fast::cuda
