// CUDA cfm: the Complementary Feature Mapper with cuBLAS/cuBLASLt (tensor cores for bf16/fp16), for one stage
// (h (B, D)) or the S stages stacked (h (S, B, D), weights (S, ...); hcd_fast/ops/cfm.py): every GEMM below is
// one strided-batched GEMM over the stages, every epilogue one launch, and zf is written straight into (S, B, n, K).
//   u      = [h ; f_t]                         (S, B, D + Dt) in the GEMM dtype g (one small copy)
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

#include <map>
#include <memory>
#include <mutex>
#include <tuple>

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

// Per stage s: row-major out[s] (rows x cols, fp32/fp64) = in[s] (rows x k) @ W[s]^T for row-major W[s] (cols x k),
// all contiguous (S, ., .): one strided-batched GEMM. In cuBLAS's column-major view, out^T (cols x rows) =
// op_T(W^T) (cols x k) * in^T (k x rows).
void gemm_rows(const Tensor& in, const Tensor& W, Tensor& out) {
  const int64_t S = in.size(0), rows = in.size(1), cols = W.size(1), k = W.size(2);
  TORCH_CHECK(in.is_contiguous() && W.is_contiguous() && out.is_contiguous() && in.size(2) == k &&
                  W.size(0) == S && out.size(0) == S && out.size(1) == rows && out.size(2) == cols,
              "cfm (cuda): gemm_rows shape mismatch");
  check_int_dims({S, rows, cols, k});
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const bool fp64 = out.scalar_type() == at::kDouble;
  const float alpha_f = 1.f, beta_f = 0.f;
  const double alpha_d = 1.0, beta_d = 0.0;
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, int(cols), int(rows), int(k),
      fp64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f),
      W.data_ptr(), cuda_dtype(W.scalar_type()), int(k), cols * k,
      in.data_ptr(), cuda_dtype(in.scalar_type()), int(k), rows * k,
      fp64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f),
      out.data_ptr(), cuda_dtype(out.scalar_type()), int(cols), rows * cols, int(S),
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

// The cuBLASLt algorithm chosen for one configuration of lt_linear_bias_relu, found once per process: the
// heuristic query costs more host time than the launch, and a training loop repeats one shape (and keeping
// it out of the steady state keeps per-call host work small inside CUDA-graph capture as well).
struct LtKey {
  int64_t S, n, k, m;
  int type, align_a, align_b, align_d, device;
  bool operator<(const LtKey& o) const {
    return std::tie(S, n, k, m, type, align_a, align_b, align_d, device) <
           std::tie(o.S, o.n, o.k, o.m, o.type, o.align_a, o.align_b, o.align_d, o.device);
  }
};
struct LtAlgo {
  bool found;
  cublasLtMatmulAlgo_t algo;
};
std::mutex lt_cache_mutex;
std::map<LtKey, LtAlgo> lt_cache;

// Per stage s: out[s] (rows x cols, row-major, dtype of u) = relu(u[s] (rows x k) @ W[s]^T + bias[s]) with
// cuBLASLt's RELU_BIAS epilogue, all S stages in one batched matmul (bias batch stride cols), for bf16/fp16 u,
// W (S x cols x k) and bias (S x cols) of that dtype, all contiguous. Column-major view (as gemm_rows): D =
// out^T (m = cols, n = rows, ld m) = op_T(A) * B with A = W stored (k x m, ld k), B = u stored (k x n, ld k);
// the bias (length m, D's rows) is broadcast over D's columns, i.e. added to every sample. Accumulation and the
// epilogue in fp32 (compute CUBLAS_COMPUTE_32F, scale fp32), split-K never reduces in the output type, and the
// result is rounded once to the output dtype. Returns false, launching nothing, when cuBLASLt offers no
// algorithm (or a degenerate size ATen also keeps off this path); the caller then takes gemm_rows + a kernel.
bool lt_linear_bias_relu(const Tensor& u, const Tensor& W, const Tensor& bias, Tensor& out) {
  const int64_t S = u.size(0), n = u.size(1), k = u.size(2), m = W.size(1);
  if (n < 2 || k < 2 || m < 2) return false;
  check_int_dims({S, n, k, m});
  const cudaDataType_t type = cuda_dtype(u.scalar_type());
  LtHandle<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> op;
  LtHandle<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> la, lb, ld;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_RELU_BIAS;
  const void* bias_ptr = bias.data_ptr();
  const int64_t bias_stride = m;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&op.h, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  TORCH_CUDABLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&la.h, type, uint64_t(k), uint64_t(m), k));  // W as stored
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&lb.h, type, uint64_t(k), uint64_t(n), k));  // u as stored
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&ld.h, type, uint64_t(m), uint64_t(n), m));  // out^T
  if (S > 1) {
    const int32_t batch = int32_t(S);
    const int64_t stride_a = m * k, stride_b = n * k, stride_d = m * n;
    TORCH_CUDABLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &bias_stride, sizeof(bias_stride)));
    for (auto& [layout, stride] : {std::pair{la.h, stride_a}, std::pair{lb.h, stride_b}, std::pair{ld.h, stride_d}}) {
      TORCH_CUDABLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
      TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                            &stride, sizeof(stride)));
    }
  }
  size_t ws_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const uint32_t align_a = alignment_of(W.data_ptr()), align_b = alignment_of(u.data_ptr()),
                 align_d = alignment_of(out.data_ptr());
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const LtKey key{S, n, k, m, int(type), int(align_a), int(align_b), int(align_d), int(u.get_device())};
  LtAlgo chosen{};
  {
    std::lock_guard<std::mutex> lock(lt_cache_mutex);
    auto it = lt_cache.find(key);
    if (it != lt_cache.end()) chosen = it->second;
    else {
      LtHandle<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> pref;
      const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_MASK & ~uint32_t(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
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
      cublasLtMatmulHeuristicResult_t heuristic = {};
      int found = 0;
      const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, op.h, la.h, lb.h, ld.h, ld.h, pref.h, 1,
                                                                   &heuristic, &found);
      chosen.found = status == CUBLAS_STATUS_SUCCESS && found > 0 && heuristic.state == CUBLAS_STATUS_SUCCESS;
      chosen.algo = heuristic.algo;
      lt_cache.emplace(key, chosen);
    }
  }
  if (!chosen.found) return false;
  const float alpha = 1.f, beta = 0.f;  // beta = 0: C (= D) is not read
  const cublasStatus_t run = cublasLtMatmul(handle, op.h, &alpha, W.data_ptr(), la.h, u.data_ptr(), lb.h, &beta,
                                            out.data_ptr(), ld.h, out.data_ptr(), ld.h, &chosen.algo, ws,
                                            ws_size, at::cuda::getCurrentCUDAStream());
  // A configuration cuBLASLt refuses at launch leaves `out` unwritten: the caller's fallback recomputes all of it.
  if (run == CUBLAS_STATUS_NOT_SUPPORTED || run == CUBLAS_STATUS_INVALID_VALUE) return false;
  TORCH_CUDABLAS_CHECK(run);
  return true;
}

// hidden[r, j] = relu(a[r, j] + bias[r / B, j]) rounded to hidden's dtype, r = s B + b over the S B rows;
// grid (S B, ceil(H / blockDim.x)).
template <typename scalar_t, typename acc_t>
__global__ void bias_relu_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ bias,
                                 scalar_t* __restrict__ hidden, int64_t B, int64_t H) {
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x, r = blockIdx.x, i = r * H + j;
  if (j < H) hidden[i] = scalar_t(max(a[i] + bias[(r / B) * H + j], acc_t(0)));
}

// Over the S B rows r = st B + b (st the stage): zf[r, s, k] = lambda_s (z[r, s K + k] + bias[st, s K + k])
// + lambda_t zt[b, k]; grid (S B, n, ceil(K / blockDim.x)).
// Arithmetic in fp64 when the output or z is fp64, else fp32.
template <typename scalar_t, typename z_t>
__global__ void fuse_teacher_kernel(const z_t* __restrict__ z,
                                    const std::conditional_t<std::is_same_v<scalar_t, double> ||
                                                                 std::is_same_v<z_t, double>, double, float>* __restrict__ bias,
                                    const scalar_t* __restrict__ zt, scalar_t* __restrict__ zf, int64_t B,
                                    int64_t nK, int64_t K, double lambda_s, double lambda_t) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<z_t, double>, double, float>;
  const int64_t k = int64_t(blockIdx.z) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t r = blockIdx.x, b = r % B, j = int64_t(blockIdx.y) * K + k, i = r * nK + j;
  zf[i] = scalar_t(acc_t(lambda_s) * (acc_t(z[i]) + bias[(r / B) * nK + j]) + acc_t(lambda_t) * acc_t(zt[b * K + k]));
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
  // Stacked stages (S, B, D) with weights (S, ...); one stage is the stacked form with S = 1.
  const bool stacked = student_feat.dim() == 3;
  const auto stage = [stacked](const Tensor& t) { return stacked ? t : t.unsqueeze(0); };
  const Tensor h = stage(student_feat);
  const int64_t S = h.size(0), B = h.size(1), H = weight1.size(-2), K = teacher_logits.size(1);
  const int64_t nK = num_sub_logits * K;
  const auto opts = student_feat.options();
  Tensor zf = at::empty({S, B, num_sub_logits, K}, opts.dtype(out_dtype));
  const auto result = [&](Tensor hidden) -> Tensor2 {
    return {stacked ? zf : zf.squeeze(0), (stacked || hidden.dim() < 3) ? hidden : hidden.squeeze(0)};
  };
  if (B == 0 || S == 0) return result(at::empty({0}, opts.dtype(out_dtype)));
  TORCH_CHECK(H > 0 && nK > 0, "cfm (cuda): empty hidden or output dimension");
  TORCH_CHECK(S * B <= int64_t(INT32_MAX) && num_sub_logits <= 65535, "cfm (cuda): batch or num_sub_logits too large");
  const Tensor u = at::cat({h.to(g), teacher_feat.to(g).expand({S, B, teacher_feat.size(1)})}, 2);  // (S, B, D + Dt)
  const Tensor w1 = stage(weight1).to(g).contiguous();
  const Tensor zt = teacher_logits.to(out_dtype).contiguous();
  const bool has_hidden = weight2.has_value() && weight2->defined();
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor hidden = at::empty({0}, opts.dtype(out_dtype));
  Tensor z, out_bias;
  if (has_hidden) {
    const Tensor b1 = stage(bias1).to(g).contiguous();  // rounded to g on both paths below
    Tensor hid = at::empty({S, B, H}, opts.dtype(g));
    if (!(low && lt_linear_bias_relu(u, w1, b1, hid))) {
      Tensor a = at::empty({S, B, H}, opts.dtype(gacc));
      gemm_rows(u, w1, a);
      const Tensor b1a = b1.to(gacc);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g, "hcd_fast_cfm_bias_relu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const dim3 grid(unsigned(S * B), blocks_for(H));
        bias_relu_kernel<scalar_t, acc_t><<<grid, kEpilogueThreads, 0, stream>>>(
            a.data_ptr<acc_t>(), b1a.data_ptr<acc_t>(), hid.data_ptr<scalar_t>(), B, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    z = at::empty({S, B, nK}, opts.dtype(gacc));
    gemm_rows(hid, stage(*weight2).to(g).contiguous(), z);
    out_bias = stage(*bias2);
    hidden = hid.to(out_dtype);
  } else {
    z = at::empty({S, B, H}, opts.dtype(gacc));
    gemm_rows(u, w1, z);
    out_bias = stage(bias1);
  }
  const bool fp64_math = out_dtype == at::kDouble || gacc == at::kDouble;
  const Tensor bias_acc = out_bias.to(fp64_math ? at::kDouble : at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "hcd_fast_cfm", [&] {
    const dim3 grid(unsigned(S * B), unsigned(num_sub_logits), blocks_for(K));
    auto launch = [&](auto zero) {
      using z_t = decltype(zero);
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<z_t, double>, double, float>;
      fuse_teacher_kernel<scalar_t, z_t><<<grid, kEpilogueThreads, 0, stream>>>(
          z.data_ptr<z_t>(), bias_acc.data_ptr<acc_t>(), zt.data_ptr<scalar_t>(), zf.data_ptr<scalar_t>(), B, nK, K,
          lambda_student, lambda_teacher);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (gacc == at::kDouble)
      launch(double(0));
    else
      launch(float(0));
  });
  return result(hidden);
}

}  // namespace hcd_fast::cuda
