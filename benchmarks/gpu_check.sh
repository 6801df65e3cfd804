#!/usr/bin/env bash
# GPU verification of hcd_fast prepared to succeed on the first try, in under 6 minutes worst case (the
# global budget, 340 s by default, bounds every stage), so a second call fits in the 15 minutes of device time.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else /tmp/hcd_gpu_check
#
# On the GPU machine (H100, Python 3.12, torch 2.11 cu130, triton 3.6, timm, nvcc 13.0, no network) it:
#   1. records the environment (nvidia-smi, versions, commit)
#   2. installs hcd_fast against the machine's own torch, offline: pip install --no-build-isolation
#      --no-deps --no-index -e . with TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=$(nproc), CUDA_HOME found
#      (falls back to setup.py build_ext --inplace)
#   3. prints the backend report (python -m hcd_fast)
#   4. runs every CUDA-marked test (pytest -m "cuda and not triton", then -m "cuda and triton"), then the
#      CUDA-graph tests (tests/test_cuda_graph.py, tests/test_distill_cuda_graph.py) as their own stage
#   4b. profiles the head per backend (and captured in a CUDA graph) and one Swin-T -> ResNet18 step
#      (python -m benchmarks.profile_head): kernel time, kernel count and wall time per module -> profile/
#   5. runs the determinism check (python -m benchmarks.determinism) and benchmarks/gpu_probe.py (~27 s)
#   6. runs the GPU benchmarks (python -m benchmarks --profile gpu): ops at the ImageNet-like shape, the
#      HCD head with every provider (eager, compile, compile-ro, each backend alone, +compile and +graph),
#      the sub_logit_loss batch sweep to 8192, the Swin-T/ViT-S -> ResNet18 steps (hcd-distill's TrainStep)
# Each stage runs under `timeout`, inside one global deadline; a failed or timed-out stage is recorded and
# the script goes on. Everything lands in OUT_DIR: logs/<stage>.log, summary.txt, backends.txt,
# determinism.json, bench/results.{json,md} + PNGs, junit XML. Re-running is safe (idempotent).
# Copy OUT_DIR/bench to benchmarks/results/<device tag>/ to commit what it measured. At the end all of it is
# packed into OUT_DIR/gpu_check.tar.gz; with HCD_GPU_CHECK_PACK=1 (default when OUT_DIR is $OUT, as on the
# lent GPU machine, which returns at most 8 files) only the tarball and 4 small files are left there.
#
# Without a GPU: HCD_GPU_CHECK_DRY=1 runs the same stages on the CPU, quickly (no install unless
# HCD_GPU_CHECK_INSTALL=1, tiny benchmark shapes), to test this script.
# Knobs: HCD_GPU_CHECK_BUDGET (total seconds, default 340), HCD_GPU_CHECK_STAGES (comma list of stages to
# run: env, install, backends, test_cuda, test_triton, test_contract, test_graph, profile, determinism, probe, bench,
# pipeline;
# default all),
# HCD_GPU_CHECK_BENCH_CASES (the runner's --cases), PYTHON (the interpreter to use).
# Measured on the first run (H100, 16 cores, 2026-11-27, benchmarks/results/h100/gpu_check/summary.txt): env 19 s,
# install 52 s, backends 6 s, test_cuda 24 s, test_triton 35 s (8 xdist workers), determinism 22 s, bench 170 s
# (budget-capped): 337 s in all, plus ~30 s of machine start. The caps below are ~2x those. Worst case: every stage
# ends by BUDGET - 20 s (+10 s to kill), the results rendering takes at most 20 s and the packing a few: ~355 s.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTDIR="${1:-${OUT:-/tmp/hcd_gpu_check}}"
mkdir -p "$OUTDIR/logs"
OUTDIR="$(cd "$OUTDIR" && pwd)"
SUMMARY="$OUTDIR/summary.txt"
DRY="${HCD_GPU_CHECK_DRY:-0}"
BUDGET="${HCD_GPU_CHECK_BUDGET:-340}"
STAGES="${HCD_GPU_CHECK_STAGES:-}"     # e.g. "backends,bench" to re-run a subset; empty = all
BENCH_CASES="${HCD_GPU_CHECK_BENCH_CASES:-head/imagenet,step,sweep,sub_logit_loss/imagenet,sub_logit_loss/fwd,bn_relu_pool/imagenet,pool_linear/imagenet,cfm/imagenet}"
START=$SECONDS
: > "$SUMMARY"
FAILED=()

say() { printf '\n=== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }

# The interpreter: $PYTHON, else the first of .venv/bin/python, python3, python that imports torch.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_check: no python with torch found" | tee -a "$SUMMARY"; exit 2; fi

# run_stage NAME MAX_SECONDS CMD...: run under timeout (capped by what is left of the budget, 20 s kept
# for the summary), log to logs/NAME.log and the terminal, record the outcome.
run_stage() {
  local name="$1" max="$2"; shift 2
  if [ -n "$STAGES" ] && [[ ",$STAGES," != *",$name,"* ]]; then
    printf '%-14s %-24s\n' "$name" "not selected" | tee -a "$SUMMARY"; return 0
  fi
  local left=$((BUDGET - (SECONDS - START) - 20))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 5 ]; then
    printf '%-14s SKIPPED (global budget of %ss spent)\n' "$name" "$BUDGET" | tee -a "$SUMMARY"
    FAILED+=("$name"); return 0
  fi
  say "$name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/logs/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0)) state="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then state="TIMEOUT after ${limit}s"; FAILED+=("$name")
  elif [ "$rc" -ne 0 ]; then state="FAILED (exit $rc)"; FAILED+=("$name"); fi
  printf '%-14s %-24s %4ss\n' "$name" "$state" "$dt" | tee -a "$SUMMARY"
  return 0
}

# --- 1. environment ------------------------------------------------------------------------------------
env_report() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "root: $ROOT  out: $OUTDIR  python: $PY  dry: $DRY  budget: ${BUDGET}s"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git; set HCD_GIT_COMMIT)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null \
    || echo "nvidia-smi: not available"
  nproc
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -c "import timm; print('timm', timm.__version__)" 2>&1 | tail -1
  "${CUDA_HOME_FOUND:-/usr/local/cuda}/bin/nvcc" --version 2>/dev/null | tail -2 || echo "nvcc: not found"
}

# CUDA_HOME: the environment's, else /usr/local/cuda, else the nvcc on PATH.
CUDA_HOME_FOUND="${CUDA_HOME:-}"
if [ -z "$CUDA_HOME_FOUND" ] || [ ! -x "$CUDA_HOME_FOUND/bin/nvcc" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME_FOUND=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then CUDA_HOME_FOUND="$(dirname "$(dirname "$(command -v nvcc)")")"
  else CUDA_HOME_FOUND="${CUDA_HOME:-/usr/local/cuda}"; fi
fi
export CUDA_HOME="$CUDA_HOME_FOUND"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # import from the tree even if the install fails
export PYTHONUNBUFFERED=1
# Record the commit in every result row. HCD_GIT_COMMIT, when the caller sets it, wins (a copied tree may carry
# a stale .git: pass HCD_GIT_COMMIT=$(git rev-parse HEAD) from the checkout that was copied); else the rows take
# HEAD and its dirty flag from git, or .git_commit where the tree has no .git.
if [ -z "${HCD_GIT_COMMIT:-}" ] && ! git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
  HCD_GIT_COMMIT="$(cat "$ROOT/.git_commit" 2>/dev/null || echo unknown)"
  export HCD_GIT_COMMIT
fi

export ROOT OUTDIR PY DRY BUDGET CUDA_HOME_FOUND
export -f env_report
run_stage env 60 bash -c env_report

# --- 2. install ----------------------------------------------------------------------------------------
install() {
  # Offline, against the machine's torch; the extension builds for sm_90 with every core.
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . && return 0
  echo "pip install failed; falling back to setup.py build_ext --inplace"
  "$PY" setup.py build_ext --inplace
}
if [ "$DRY" = "1" ] && [ "${HCD_GPU_CHECK_INSTALL:-0}" != "1" ]; then
  printf '%-14s %-24s\n' install "skipped (dry run)" | tee -a "$SUMMARY"
else
  export -f install
  run_stage install 150 bash -c install
fi

# --- 3. backend report ---------------------------------------------------------------------------------
run_stage backends 60 "$PY" -m hcd_fast
cp "$OUTDIR/logs/backends.log" "$OUTDIR/backends.txt" 2>/dev/null || true

# --- 4. tests ------------------------------------------------------------------------------------------
# Every CUDA test runs once, selected by marker over tests/ (tests/helpers.py marks the GPU parameters of the
# backend-parametrized files `cuda`, and the Triton ones `triton`; tests/conftest.py marks tests/test_triton*.py
# `triton`): test_cuda runs `cuda and not triton` (the compiled CUDA backend),
# test_triton runs `cuda and triton`. The Triton ones are dominated by JIT compiles (1-4 s per distinct kernel
# configuration), so they run on 8 pytest-xdist workers (on the GPU image) when it is there.
XDIST=""
if [ "$DRY" != "1" ] && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST="-n 8"; fi
# The CUDA-graph tests (capture, make_graphed_callables, torch.compile reduce-overhead, hcd-distill --cuda-graph)
# compile and capture: their own stage (test_graph, below), so a slow compile cannot cut the kernel tests short.
GRAPH_TESTS="tests/test_cuda_graph.py tests/test_distill_cuda_graph.py"
NO_GRAPH="--ignore=tests/test_cuda_graph.py --ignore=tests/test_distill_cuda_graph.py"
run_stage test_cuda 90 "$PY" -m pytest -m "cuda and not triton" -q -p no:cacheprovider $NO_GRAPH \
  --junitxml="$OUTDIR/junit_cuda.xml" tests
if [ "$DRY" = "1" ]; then
  # On CPU the Triton tests run in the interpreter (the normal test suite does that); only collect them.
  run_stage test_triton 60 "$PY" -m pytest -m "cuda and triton" -q -p no:cacheprovider $NO_GRAPH --collect-only tests
else
  # On the GPU: TRITON_INTERPRET unset, so tests/conftest.py leaves Triton on the real device.
  run_stage test_triton 150 env -u TRITON_INTERPRET "$PY" -m pytest -m "cuda and triton" -q -p no:cacheprovider \
    $NO_GRAPH $XDIST --junitxml="$OUTDIR/junit_triton.xml" tests
fi

# The op contract (tests/test_op_contract.py: dtypes, aliasing, opcheck, compiled gradients, ortho_on, large
# logits) is parametrized over the backends available on the device: on the GPU, triton and cuda.
if [ "$DRY" = "1" ]; then
  run_stage test_contract 60 "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_op_contract.py
else
  run_stage test_contract 90 env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider $XDIST \
    --junitxml="$OUTDIR/junit_contract.xml" tests/test_op_contract.py
fi

# CUDA graphs: the head captured (torch.cuda.graph, make_graphed_callables) and compiled (reduce-overhead) on every
# GPU backend, and hcd-distill --cuda-graph (the whole step, optimizer included) against eager runs: three direct
# comparisons and three pairs of CLI runs (estimate, not yet measured on a GPU: ~90-150 s, mostly inductor compiles
# and CLI start-ups; on 8 xdist workers when pytest-xdist is installed).
if [ "$DRY" = "1" ]; then
  run_stage test_graph 60 "$PY" -m pytest -m cuda -q -p no:cacheprovider --collect-only $GRAPH_TESTS
else
  run_stage test_graph 180 env -u TRITON_INTERPRET "$PY" -m pytest -m cuda -q -p no:cacheprovider $XDIST \
    --junitxml="$OUTDIR/junit_graph.xml" $GRAPH_TESTS
fi

# --- 4b. profile: where the head's and the step's time goes (benchmarks/profile_head.py) --------------------------
# Per range (each projector's depthwise/pointwise convs and BatchNorms, the CFMs, sub_logit_loss; teacher, student
# forward, head, backward, optimizer for the step): GPU kernel time, kernel count, wall time; the whole: wall vs
# GPU busy time. It writes profile/profile.{json,md} after every profile, so a timeout keeps what was measured.
# Estimate (not yet measured on a GPU): ~60 s for 3 providers + their CUDA graphs + one step at B=128.
if [ "$DRY" = "1" ]; then
  run_stage profile 90 "$PY" -m benchmarks.profile_head --device cpu --quick --providers reference,cpu \
    --out "$OUTDIR/profile"
else
  run_stage profile 90 "$PY" -m benchmarks.profile_head --device cuda --out "$OUTDIR/profile"
fi

# --- 5. determinism ------------------------------------------------------------------------------------
if [ "$DRY" = "1" ]; then
  run_stage determinism 60 "$PY" -m benchmarks.determinism --quick --out "$OUTDIR/determinism.json"
else
  run_stage determinism 45 "$PY" -m benchmarks.determinism --out "$OUTDIR/determinism.json"
fi

# --- 5b. probe: torch.compile gradients of pool_linear per backend, a profile of sub_logit_loss's kernels ---------
if [ "$DRY" = "1" ]; then
  printf '%-14s %-24s\n' probe "skipped (dry run: needs CUDA)" | tee -a "$SUMMARY"
else
  run_stage probe 60 "$PY" benchmarks/gpu_probe.py
fi

# --- 6. benchmarks -------------------------------------------------------------------------------------
# The runner drops the compiled providers once its own budget is spent (checked before each, so at most one
# head compile, ~45 s on an H100, runs past it) and rewrites results.json after every provider on CUDA, so a
# timeout still leaves the rows measured so far.
# Its budget: 60% of what is left (compile dropped after it, remaining cases skipped after 1.3x of it).
LEFT=$((BUDGET - (SECONDS - START) - 30))
BENCH_BUDGET=$(( LEFT * 3 / 5 > 10 ? LEFT * 3 / 5 : 10 ))
if [ "$DRY" = "1" ]; then
  run_stage bench 120 "$PY" -m benchmarks --quick --device cpu --providers eager,fused --variants kd,hcd \
    --out "$OUTDIR/bench"
else
  run_stage bench 400 "$PY" -m benchmarks --device cuda --profile gpu --budget-s "$BENCH_BUDGET" \
    --cases "$BENCH_CASES" \
    --out "$OUTDIR/bench"
fi

# --- 7. the whole-pipeline benchmark (loader, teacher, steps, teacher cache; benchmarks/pipeline.py) --------
# Last, with what the budget leaves: ~60 s on a 16-core H100 host without the compiled-teacher row (estimate,
# not yet measured on a GPU); run it alone with HCD_GPU_CHECK_STAGES=env,install,pipeline for the full profile.
if [ "$DRY" = "1" ]; then
  run_stage pipeline 120 "$PY" -m benchmarks pipeline --profile quick --device cpu --data-root /tmp/hcd_fast_cache \
    --out "$OUTDIR/pipeline" --no-plots
else
  run_stage pipeline 180 "$PY" -m benchmarks pipeline --device cuda --profile gpu --no-compile \
    --data-root /tmp/hcd_fast_cache --out "$OUTDIR/pipeline"
fi

# A bench stage cut short leaves results.json without results.md: render what it measured.
if [ -f "$OUTDIR/bench/results.json" ] && [ ! -f "$OUTDIR/bench/results.md" ]; then
  timeout 20 "$PY" -m benchmarks.report "$OUTDIR/bench/results.json" || true
fi

# --- summary -------------------------------------------------------------------------------------------
say "summary ($((SECONDS - START))s of ${BUDGET}s)"
cat "$SUMMARY"
if [ -f "$OUTDIR/bench/results.md" ]; then sed -n '1,/^## Ops/p' "$OUTDIR/bench/results.md" | head -40; fi
STATUS=0
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED stages: ${FAILED[*]}" | tee -a "$SUMMARY"
  STATUS=1
else
  echo "all stages ok" | tee -a "$SUMMARY"
fi

# --- pack ----------------------------------------------------------------------------------------------
# The device tool brings back at most 8 files from $OUT: everything goes into one tarball, and with
# HCD_GPU_CHECK_PACK=1 (the default when writing to $OUT) only the tarball, the summary, the backend report,
# the results JSON/markdown and the profile table stay beside it (8 files).
PACK="${HCD_GPU_CHECK_PACK:-}"
if [ -z "$PACK" ]; then
  if [ -n "${OUT:-}" ] && [ "$(cd "$OUT" 2>/dev/null && pwd)" = "$OUTDIR" ]; then PACK=1; else PACK=0; fi
fi
tar -czf "/tmp/gpu_check.$$.tar.gz" -C "$OUTDIR" . && mv "/tmp/gpu_check.$$.tar.gz" "$OUTDIR/gpu_check.tar.gz"
if [ "$PACK" = "1" ]; then
  find "$OUTDIR" -type f ! -name gpu_check.tar.gz ! -name summary.txt ! -name backends.txt \
    ! -path "$OUTDIR/bench/results.json" ! -path "$OUTDIR/bench/results.md" ! -path "$OUTDIR/profile/profile.md" \
    ! -path "$OUTDIR/pipeline/pipeline.json" ! -path "$OUTDIR/pipeline/pipeline.md" -delete
  find "$OUTDIR" -mindepth 1 -type d -empty -delete
fi
echo "everything: $OUTDIR/gpu_check.tar.gz (tar -xzf it into benchmarks/results/<device>/ to commit the bench part)"
exit $STATUS
