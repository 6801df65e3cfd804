// CUDA cfm: the Complementary Feature Mapper with cuBLAS/cuBLASLt (tensor cores for bf16/fp16), for one stage
// (h (B, D)) or the S stages stacked (h (S, B, D), weights (S, ...); hcd_fast/ops/cfm.py): every GEMM below is
// one strided-batched GEMM over the stages, every epilogue one launch, and zf is written straight into (S, B, n, K).
//   u      = [h ; f_t]                         (S, B, D + Dt) in the GEMM dtype g (one small copy)
//   hidden = relu(u W1^T + b1)                 one cuBLASLt GEMM with the RELU_BIAS epilogue, written in g
//                                              (fp32/fp64 g, or no cuBLASLt algorithm: GEMM + epilogue kernel)
//   z      = hidden W2^T                       GEMM with an fp32 output (fp64 for fp64 g); z = u W1^T without W2
//   zf     = lambda_s (z + b2) + lambda_t z_t  epilogue kernel, broadcast over the n sub-logits, rounded once
// The GEMM dtype g is the activation dtype: student_feat's dtype when it is bf16/fp16, else the compute dtype
// (fp32, or fp64 with any fp64 input). It is the rule of the backward (cfm_backward below), so forward and
// backward run the same GEMMs: under autocast with fp32 weights and bf16 features, bf16 x bf16 tensor-core
// GEMMs with fp32 accumulation (W1, W2, f_t and b1 rounded to bf16, as F.linear does under autocast), not an
// fp32 SGEMM. What the op takes and returns is unchanged: zf and hidden in the promoted input dtype (hidden is
// the g-rounded ReLU output the second GEMM read).
// The backward (cfm_backward) runs the ReLU gradient and both bias gradients as cuBLASLt epilogues of its GEMMs
// for bf16/fp16; see the comment there. Every cuBLASLt matmul of this file goes through lt_matmul: descriptors,
// layouts and the heuristic's algorithm are built once per problem (shape, dtype, epilogue, alignments) and cached.
#include <ATen/cuda/Exceptions.h>
#include <cublasLt.h>
#include <cublas_v2.h>

#include <atomic>
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

// One operand of gemm_batched: column-major with leading dimension ld, entry s of the batch at ptr + s * stride
// elements (stride 0: the same matrix for every entry).
struct Operand {
  const void* ptr;
  at::ScalarType type;
  int64_t ld, stride;
};

// cuBLAS strided-batched GEMM, column-major: C[s] (m x n, ldc) = op(A[s]) op(B[s]) for s < batch, fp32
// accumulation (fp64 when C is fp64), C overwritten (beta = 0).
void gemm_batched(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, const Operand& a,
                  const Operand& b, void* c, at::ScalarType c_type, int64_t ldc, int64_t stride_c, int64_t batch) {
  check_int_dims({m, n, k, a.ld, b.ld, ldc, batch});
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const bool fp64 = c_type == at::kDouble;
  const float alpha_f = 1.f, beta_f = 0.f;
  const double alpha_d = 1.0, beta_d = 0.0;
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, ta, tb, int(m), int(n), int(k),
      fp64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f),
      a.ptr, cuda_dtype(a.type), int(a.ld), a.stride, b.ptr, cuda_dtype(b.type), int(b.ld), b.stride,
      fp64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f),
      c, cuda_dtype(c_type), int(ldc), stride_c, int(batch),
      fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Per stage s: row-major out[s] (rows x cols, fp32/fp64) = in[s] (rows x k) @ W[s]^T for row-major W[s] (cols x k),
// all contiguous (S, ., .): one strided-batched GEMM. In cuBLAS's column-major view, out^T (cols x rows) =
// op_T(W^T) (cols x k) * in^T (k x rows).
void gemm_rows(const Tensor& in, const Tensor& W, Tensor& out) {
  const int64_t S = in.size(0), rows = in.size(1), cols = W.size(1), k = W.size(2);
  TORCH_CHECK(in.is_contiguous() && W.is_contiguous() && out.is_contiguous() && in.size(2) == k &&
                  W.size(0) == S && out.size(0) == S && out.size(1) == rows && out.size(2) == cols,
              "cfm (cuda): gemm_rows shape mismatch");
  gemm_batched(CUBLAS_OP_T, CUBLAS_OP_N, cols, rows, k, {W.data_ptr(), W.scalar_type(), k, cols * k},
               {in.data_ptr(), in.scalar_type(), k, rows * k}, out.data_ptr(), out.scalar_type(), cols, rows * cols,
               S);
}

// Largest power of two (<= 256) dividing the address: the alignment cuBLASLt may assume for the operand.
int64_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int64_t al = 1;
  while (al < 256 && a % (2 * al) == 0) al *= 2;
  return al;
}

template <typename T, cublasStatus_t (*Destroy)(T)>
struct LtHandle {  // owns one cuBLASLt descriptor
  T h = nullptr;
  LtHandle() = default;
  LtHandle(const LtHandle&) = delete;
  LtHandle& operator=(const LtHandle&) = delete;
  ~LtHandle() {
    if (h != nullptr) Destroy(h);
  }
};

// One cuBLASLt matmul problem, column-major as cuBLAS: D[s] (m x n, ldd) = epilogue(op(A[s]) op(B[s])) for
// s < batch, A, B and D of one dtype (bf16/fp16 in this file), fp32 accumulation and scale, beta = 0. A bias
// (forward) or bias-gradient (backward) vector, when the epilogue has one, has batch stride bias_stride; a ReLU
// bit-mask (DRELU_BGRAD), leading dimension aux_ld and batch stride aux_stride, both in bits (0: none).
struct LtMatmul {
  cublasOperation_t ta, tb;
  int64_t m, n, k, batch, lda, ldb, ldd, stride_a, stride_b, stride_d;
  at::ScalarType type;
  cublasLtEpilogue_t epilogue;
  int64_t bias_stride, aux_ld, aux_stride;
};
// The device pointers of one call (bias: the bias, or the bias gradient the epilogue writes).
struct LtArgs {
  const void* a;
  const void* b;
  void* d;
  const void* bias;
  const void* aux;
};

// Descriptors, layouts and the algorithm of one LtMatmul at given pointer alignments, built once per process:
// the heuristic query costs more host time than the launch and a training loop repeats one shape, and nothing is
// created on the hot path (CUDA-graph capture included). Only the pointer attributes are set per call.
struct LtPlan {
  LtHandle<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> desc;
  LtHandle<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> la, lb, ld;
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};
using LtKey = std::array<int64_t, 24>;
std::mutex lt_mutex;  // guards lt_plans and the per-call pointer attributes of a plan's descriptor
std::map<LtKey, std::unique_ptr<LtPlan>> lt_plans;

template <typename T>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

template <typename T>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

// Builds the plan of p and asks the heuristic for one algorithm. Determinism: the algorithm is chosen once and
// kept, the workspace is PyTorch's cuBLASLt workspace of fixed size, and split-K may only reduce in the compute
// type in a separate step (never in place or in the output type): the same inputs give the same bits, bias
// gradients included (the BGRAD epilogues reduce in a fixed order for a fixed algorithm).
std::unique_ptr<LtPlan> make_plan(const LtMatmul& p, const LtArgs& x, cublasLtHandle_t handle, size_t ws_size) {
  auto plan = std::make_unique<LtPlan>();
  const cudaDataType_t type = cuda_dtype(p.type);
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc.h, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_TRANSA, p.ta);
  set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_TRANSB, p.tb);
  set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE, p.epilogue);
  if (x.bias != nullptr) {  // the heuristic reads the pointers' alignment, so it sees this call's pointers
    set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, x.bias);
    if (p.batch > 1) set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, p.bias_stride);
  }
  if (p.aux_ld > 0) {
    set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, x.aux);
    set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, p.aux_ld);
    if (p.batch > 1) set_desc(plan->desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, p.aux_stride);
  }
  const bool a_n = p.ta == CUBLAS_OP_N, b_n = p.tb == CUBLAS_OP_N;  // stored shapes: op(A) is m x k, op(B) k x n
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->la.h, type, uint64_t(a_n ? p.m : p.k),
                                                  uint64_t(a_n ? p.k : p.m), p.lda));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->lb.h, type, uint64_t(b_n ? p.k : p.n),
                                                  uint64_t(b_n ? p.n : p.k), p.ldb));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->ld.h, type, uint64_t(p.m), uint64_t(p.n), p.ldd));
  if (p.batch > 1) {
    const int32_t batch = int32_t(p.batch);
    for (auto [layout, stride] : {std::pair{plan->la.h, p.stride_a}, std::pair{plan->lb.h, p.stride_b},
                                  std::pair{plan->ld.h, p.stride_d}}) {
      TORCH_CUDABLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
      TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                            &stride, sizeof(stride)));
    }
  }
  LtHandle<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> pref;
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_MASK & ~uint32_t(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE |
                                                                         CUBLASLT_REDUCTION_SCHEME_INPLACE);
  const auto align_a = uint32_t(alignment_of(x.a)), align_b = uint32_t(alignment_of(x.b)),
             align_d = uint32_t(alignment_of(x.d));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
  set_pref(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws_size);
  set_pref(pref.h, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reduction);
  set_pref(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
  set_pref(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
  set_pref(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
  set_pref(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc.h, plan->la.h, plan->lb.h,
                                                               plan->ld.h, plan->ld.h, pref.h, 1, &heuristic, &found);
  plan->found = status == CUBLAS_STATUS_SUCCESS && found > 0 && heuristic.state == CUBLAS_STATUS_SUCCESS;
  plan->algo = heuristic.algo;
  return plan;
}

// Runs p on x with its cached plan. Returns false, launching nothing, when cuBLASLt offers no algorithm for it
// (or refuses it at launch, which is remembered), or for a degenerate size (m, n or k < 2) ATen also keeps off
// cuBLASLt: the caller then computes the same result another way.
bool lt_matmul(const LtMatmul& p, const LtArgs& x) {
  if (p.m < 2 || p.n < 2 || p.k < 2) return false;
  TORCH_CHECK(p.batch <= int64_t(INT32_MAX), "cfm (cuda): too many stages");
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const size_t ws_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const LtKey key{int64_t(p.ta), int64_t(p.tb), p.m, p.n, p.k, p.batch, p.lda, p.ldb, p.ldd, p.stride_a,
                  p.stride_b, p.stride_d, int64_t(p.type), int64_t(p.epilogue), p.bias_stride, p.aux_ld,
                  p.aux_stride, alignment_of(x.a), alignment_of(x.b), alignment_of(x.d),
                  x.bias == nullptr ? 0 : alignment_of(x.bias), x.aux == nullptr ? 0 : alignment_of(x.aux),
                  int64_t(c10::cuda::current_device()), int64_t(ws_size)};
  std::lock_guard<std::mutex> lock(lt_mutex);
  std::unique_ptr<LtPlan>& slot = lt_plans[key];
  if (!slot) slot = make_plan(p, x, handle, ws_size);
  LtPlan& plan = *slot;
  if (!plan.found) return false;
  if (x.bias != nullptr) set_desc(plan.desc.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, x.bias);
  if (p.aux_ld > 0) set_desc(plan.desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, x.aux);
  const float alpha = 1.f, beta = 0.f;  // beta = 0: C (= D) is not read
  const cublasStatus_t run = cublasLtMatmul(handle, plan.desc.h, &alpha, x.a, plan.la.h, x.b, plan.lb.h, &beta, x.d,
                                            plan.ld.h, x.d, plan.ld.h, &plan.algo, ws, ws_size,
                                            at::cuda::getCurrentCUDAStream());
  // A configuration cuBLASLt refuses at launch leaves D unwritten: the caller's fallback recomputes all of it.
  if (run == CUBLAS_STATUS_NOT_SUPPORTED || run == CUBLAS_STATUS_INVALID_VALUE) {
    plan.found = false;
    return false;
  }
  TORCH_CUDABLAS_CHECK(run);
  return true;
}

// Per stage s: out[s] (rows x cols, row-major, dtype of u) = relu(u[s] (rows x k) @ W[s]^T + bias[s]) with
// cuBLASLt's RELU_BIAS epilogue, all S stages in one batched matmul (bias batch stride cols), for bf16/fp16 u,
// W (S x cols x k) and bias (S x cols) of that dtype, all contiguous. Column-major view (as gemm_rows): D =
// out^T (m = cols, n = rows, ld m) = op_T(A) * B with A = W stored (k x m, ld k), B = u stored (k x n, ld k);
// the bias (length m, D's rows) is broadcast over D's columns, i.e. added to every sample. Accumulation and the
// epilogue in fp32, the result rounded once to the output dtype. Returns false, launching nothing, when
// cuBLASLt offers no algorithm; the caller then takes gemm_rows + a kernel.
bool lt_linear_bias_relu(const Tensor& u, const Tensor& W, const Tensor& bias, Tensor& out) {
  const int64_t S = u.size(0), n = u.size(1), k = u.size(2), m = W.size(1);
  const LtMatmul p{CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, S, k, k, m, m * k, n * k, m * n, u.scalar_type(),
                   CUBLASLT_EPILOGUE_RELU_BIAS, m, 0, 0};
  return lt_matmul(p, {W.data_ptr(), u.data_ptr(), out.data_ptr(), bias.data_ptr(), nullptr});
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


// The backward's operands from the output gradient and the hidden activation, one block per row r = s B + b of
// the S B rows (blockDim.x a multiple of 32), in one pass over both:
//   gz[r, j]  = g(lambda_s grad[r, j]), j < nK                  dz, the GEMM operand, rounded once to g
//   hid[r, j] = g(hidden[r, j]), j < H (when hid is given)       exact: the forward rounded hidden to g
//   mask[r, w] bit i = [hidden[r, 32 w + i] > 0], w < words     the ReLU bit-mask cuBLASLt's DRELU epilogue reads
// The bit-mask is the one the RELU_AUX epilogues write for the column-major H x B matrix of each stage: element
// (j, b) of stage s is bit s aux_stride + b aux_ld + j, packed little-endian into 32-bit words, with aux_ld =
// 32 words (a multiple of 128 bits) and aux_stride = B aux_ld; bits j >= H are 0. Built here from hidden rather
// than by the forward, so the forward's outputs (and every backend's contract) stay as they are; [hidden > 0]
// is also exactly the mask PyTorch's ReLU backward (and the ATen path) uses.
template <typename scalar_t, typename g_t>
__global__ void backward_operands_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ hidden,
                                         g_t* __restrict__ gz, g_t* __restrict__ hid, uint32_t* __restrict__ mask,
                                         int64_t nK, int64_t H, int64_t words, float lambda_s) {
  const int64_t r = blockIdx.x;
  for (int64_t j = threadIdx.x; j < nK; j += blockDim.x) gz[r * nK + j] = g_t(lambda_s * float(grad[r * nK + j]));
  const int lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int64_t w = threadIdx.x / kWarp; w < words; w += warps) {  // one word per warp step: the ballot's lanes
    const int64_t j = w * kWarp + lane;
    const float v = j < H ? float(hidden[r * H + j]) : 0.f;
    if (hid != nullptr && j < H) hid[r * H + j] = g_t(v);
    const unsigned bits = __ballot_sync(0xffffffffu, v > 0.f);
    if (lane == 0) mask[r * words + w] = bits;
  }
}

std::atomic<int64_t> epilogue_calls{0};

}  // namespace

int64_t cfm_backward_epilogue_calls() { return epilogue_calls.load(); }

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


// Backward, per stage, with dz = lambda_s g (hcd_fast/ops/cfm.py):
//   dW2 = dz^T relu(a), db2 = sum_b dz     one cuBLASLt GEMM, BGRADB epilogue (bias gradient of its B operand dz)
//   da = (dz W2) [hidden > 0], db1 = sum_b da   one cuBLASLt GEMM, DRELU_BGRAD epilogue (ReLU bit-mask as aux)
//   dh = da W1[:, :D]                      one cuBLAS GEMM reading W1's first D columns in place
//   dW1 = da^T [h ; f_t]                   two cuBLAS GEMMs into dW1's two column blocks (f_t: batch stride 0)
// plus one kernel for the operands (backward_operands_kernel: dz and the bit-mask, hidden in g if needed).
// That path is taken for bf16/fp16 activations with weights and biases of that dtype, a hidden layer and no fp64
// input (as under autocast); anything else (fp32/fp64 GEMMs, mixed dtypes, no hidden layer), and any GEMM
// cuBLASLt has no algorithm for (odd sizes or alignments, B or H < 2), keeps the ATen sequence of
// cfm_backward_aten, for the whole backward or for that GEMM.
// Deterministic: the bias gradients are reduced by the epilogues of an algorithm chosen once per problem and kept,
// with a fixed workspace (make_plan); the rest is plain GEMMs and one elementwise kernel.
// Byte model (elementwise traffic besides the GEMMs' own operands; SB = S B rows, o = bytes of the output dtype,
// 2 = bf16/fp16): the ATen sequence casts dz (6 SB nK with o = 4) and hidden (6 SB H), sums db2 (4 SB nK), masks
// da (6 SB H), sums db1 (2 SB H) and concatenates u (4 SB (D + Dt)), plus 8 SB nK for lambda_s != 1: 12 launches
// (13), the two bias-gradient casts included, for 58.3 MB (91.0 MB) at the ImageNet head (S 4, B 256,
// n K 4000, H = D = Dt = 768, o = 4). This path reads the output gradient and hidden once and writes dz, hidden
// in g and the bit-mask (6 SB nK + 6.125 SB H): 6 launches for 29.4 MB, the masking and both reductions riding on
// the GEMMs' epilogues (cuBLASLt may split a matmul into more than one kernel; the GPU profile's kernel count is
// the measure). Compiled for sm_90, unverified on a GPU.
Tensor5 cfm_backward(HCD_CFM_BWD_ARGS) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(student_feat.is_cuda(), "cfm_backward (cuda): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(student_feat.device());
  const auto g = student_feat.scalar_type();
  const bool has_hidden = weight2.has_value() && weight2->defined();
  const auto same = [g](at::ScalarType t) { return t == g; };
  const bool epilogue_path = (g == at::kBFloat16 || g == at::kHalf) && has_hidden && same(weight1.scalar_type()) &&
                             same(bias1_dtype) && same(weight2->scalar_type()) && same(bias2_dtype.value_or(g)) &&
                             teacher_feat.scalar_type() != at::kDouble && hidden.scalar_type() != at::kDouble &&
                             grad_sub_logits.scalar_type() != at::kDouble && student_feat.numel() > 0 &&
                             teacher_feat.size(1) > 0;
  if (!epilogue_path)
    return cfm_backward_aten(grad_sub_logits, student_feat, teacher_feat, weight1, weight2, hidden, lambda_student,
                             bias1_dtype, bias2_dtype, output_mask);
  const bool stacked = student_feat.dim() == 3;
  const auto stage = [stacked](const Tensor& t) { return stacked ? t : t.unsqueeze(0); };
  const auto unstage = [stacked](const Tensor& t) { return stacked ? t : t.squeeze(0); };
  const Tensor h = stage(student_feat).contiguous(), w1 = stage(weight1).contiguous();
  const Tensor w2 = stage(*weight2).contiguous(), hidden_s = stage(hidden).contiguous();
  const Tensor grad = grad_sub_logits.to(hidden_s.scalar_type()).contiguous();
  const Tensor ft = teacher_feat.to(g).contiguous();
  const int64_t S = h.size(0), B = h.size(1), D = h.size(2), Dt = ft.size(1), H = w1.size(1), nK = w2.size(1);
  TORCH_CHECK(S * B <= int64_t(INT32_MAX), "cfm_backward (cuda): too many rows");
  const auto opts = student_feat.options().dtype(g);
  const auto none = [&] { return at::empty({0}, opts); };
  auto stream = at::cuda::getCurrentCUDAStream();

  const int64_t aux_ld = (H + 127) / 128 * 128, words = aux_ld / kWarp;  // bits; a multiple of 128
  Tensor gz = at::empty({S, B, nK}, opts);
  Tensor hid = hidden_s.scalar_type() == g ? hidden_s : at::empty({S, B, H}, opts);
  Tensor mask = at::empty({S, B, words}, opts.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "hcd_fast_cfm_backward", [&] {
    auto launch = [&](auto zero) {
      using g_t = decltype(zero);
      backward_operands_kernel<scalar_t, g_t><<<unsigned(S * B), kEpilogueThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), hidden_s.data_ptr<scalar_t>(), gz.data_ptr<g_t>(),
          hid.is_same(hidden_s) ? nullptr : hid.data_ptr<g_t>(), reinterpret_cast<uint32_t*>(mask.data_ptr<int>()),
          nK, H, words, float(lambda_student));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (g == at::kBFloat16)
      launch(at::BFloat16(0));
    else
      launch(at::Half(0));
  });

  int lt_ran = 0;
  // dW2 (S, nK, H) and db2 (S, nK): column-major D = dW2^T (H x nK) = hid^T-view (H x B, ld H) * op_T(dz^T-view
  // (nK x B, ld nK)); BGRADB sums op(B) = dz over k = B: db2, one per column of D.
  Tensor gw2 = none(), gb2 = none();
  if (output_mask[3] || output_mask[4]) {
    gw2 = at::empty({S, nK, H}, opts);
    gb2 = at::empty({S, nK}, opts);
    const LtMatmul p{CUBLAS_OP_N, CUBLAS_OP_T, H, nK, B, S, H, nK, H, B * H, B * nK, nK * H, g,
                     CUBLASLT_EPILOGUE_BGRADB, nK, 0, 0};
    if (lt_matmul(p, {hid.data_ptr(), gz.data_ptr(), gw2.data_ptr(), gb2.data_ptr(), nullptr})) {
      ++lt_ran;
    } else {
      gw2 = at::bmm(gz.transpose(1, 2), hid);
      gb2 = gz.sum(1, false, at::kFloat).to(g);
    }
  }
  // da (S, B, H) and db1 (S, H): column-major D = da^T (H x B) = W2^T-view (H x nK, ld H) * dz^T-view (nK x B),
  // the ReLU mask applied to D and DRELU_BGRAD's bias gradient summed over D's columns (the samples): db1.
  Tensor gh = none(), gw1 = none(), gb1 = none();
  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    Tensor ga = at::empty({S, B, H}, opts);
    gb1 = at::empty({S, H}, opts);
    const LtMatmul p{CUBLAS_OP_N, CUBLAS_OP_N, H, B, nK, S, H, nK, H, nK * H, B * nK, B * H, g,
                     CUBLASLT_EPILOGUE_DRELU_BGRAD, H, aux_ld, B * aux_ld};
    if (lt_matmul(p, {w2.data_ptr(), gz.data_ptr(), ga.data_ptr(), gb1.data_ptr(), mask.data_ptr()})) {
      ++lt_ran;
    } else {
      ga = at::threshold_backward(at::bmm(gz, w2), hid, 0);
      gb1 = ga.sum(1, false, at::kFloat).to(g);
    }
    if (output_mask[0]) {  // dh^T (D x B) = W1[:, :D]^T-view (D x H, ld D + Dt) * da^T-view (H x B, ld H)
      gh = at::empty({S, B, D}, opts);
      gemm_batched(CUBLAS_OP_N, CUBLAS_OP_N, D, B, H, {w1.data_ptr(), g, D + Dt, H * (D + Dt)},
                   {ga.data_ptr(), g, H, B * H}, gh.data_ptr(), g, D, B * D, S);
    }
    if (output_mask[1]) {  // dW1^T's row blocks (x = h or f_t): (x^T-view (Dx x B)) * op_T(da^T-view (H x B))
      gw1 = at::empty({S, H, D + Dt}, opts);
      char* base = static_cast<char*>(gw1.data_ptr());
      gemm_batched(CUBLAS_OP_N, CUBLAS_OP_T, D, H, B, {h.data_ptr(), g, D, B * D}, {ga.data_ptr(), g, H, B * H},
                   base, g, D + Dt, H * (D + Dt), S);
      gemm_batched(CUBLAS_OP_N, CUBLAS_OP_T, Dt, H, B, {ft.data_ptr(), g, Dt, 0}, {ga.data_ptr(), g, H, B * H},
                   base + D * gw1.element_size(), g, D + Dt, H * (D + Dt), S);
    }
    if (!output_mask[2]) gb1 = none();
  }
  if (!output_mask[3]) gw2 = none();
  if (!output_mask[4]) gb2 = none();
  if (lt_ran == int(output_mask[3] || output_mask[4]) + int(output_mask[0] || output_mask[1] || output_mask[2]))
    ++epilogue_calls;
  return {unstage(gh), unstage(gw1), unstage(gb1), unstage(gw2), unstage(gb2)};  // (0,) ones stay (0,)
}

}  // namespace hcd_fast::cuda
