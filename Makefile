# hcd_fast: `make test` and `make bench` each set up everything on a fresh machine, then run.
# Re-running installs nothing that is already there (stamp files under .venv/).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The development machines install these from local disk; the GPU machine uses its own torch
# (benchmarks/gpu_check.sh), which pyproject's range also admits.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
DEPS := timm numpy tqdm pytest pytest-benchmark ninja pybind11 matplotlib scikit-learn setuptools wheel
# The C++/CUDA extension build (see setup.py): Hopper by default, every core.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= $(shell nproc)

BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: setup test bench bench-pipeline demo clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.deps: $(VENV)/.created
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_PKGS)
	$(PIP) install -q $(DEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(BUILD_INPUTS)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m benchmarks

# Where a distillation step's wall time goes (loader, teacher, student + head; teacher cache), on a synthetic
# JPEG ImageFolder generated once under ~/.cache/hcd_fast (benchmarks/pipeline.py).
bench-pipeline: setup
	$(PY) -m benchmarks pipeline

# hcd-distill on the embedded digits data (CPU, a few minutes): ViT teacher (cached under runs/demo/),
# then ce / kd / hcd into a tiny ResNet over 3 seeds; prints accuracy and wall time per method.
demo: setup
	$(PY) -m hcd_fast.distill.demo

clean:
	rm -rf build *.egg-info hcd_fast/*.so
