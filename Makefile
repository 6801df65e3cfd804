# hcd_fast: `make test` and `make bench` each set up everything on a fresh machine, then run.
# Re-running installs nothing that is already there (stamp files under .venv/).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The development machines install these from local disk; the GPU machine uses its own torch
# (benchmarks/gpu_check.sh), which pyproject's range also admits.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
DEPS := timm numpy tqdm pytest ninja pybind11 matplotlib scikit-learn setuptools wheel
# hcd-distill --loader dali (pyproject's [dali] extra, ~200 MB): make test runs its loader tests on DALI's CPU backend.
DALI_PKGS ?= nvidia-dali-cuda130==2.4.0
# The C++/CUDA extension build (see setup.py): Hopper by default, every core.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= $(shell nproc)

BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: setup test test-compat bench bench-pipeline demo clean

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

$(VENV)/.dali: $(VENV)/.deps
	$(PIP) install -q $(DALI_PKGS)
	touch $@

setup: $(VENV)/.installed $(VENV)/.dali

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
	$(PY) -m experiments.demo

# The compatibility lane: the GPU machine's torch 2.11 / triton 3.6 (from the package index; triton 3.6's
# interpreter needs numpy < 2.4) in .venv-compat. It builds the extension (CPU and sm_90 CUDA kernels) and runs
# the CPU and Triton-interpreter tests in a copy of the tree under .venv-compat/src, so neither lane's
# in-place hcd_fast/_C*.so (same file name, different torch ABI) overwrites the other's. Run it before a change
# to kernels/, csrc/, hcd_fast/ops/ or the build files is submitted; CI runs `make test` only.
COMPAT := .venv-compat
COMPAT_PY := $(COMPAT)/bin/python
COMPAT_TORCH_PKGS ?= torch==2.11.0 torchvision==0.26.0 "numpy<2.4"

$(COMPAT)/.deps:
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT_PY) -m pip install -q $(COMPAT_TORCH_PKGS)
	$(COMPAT_PY) -m pip install -q $(filter-out numpy,$(DEPS)) "numpy<2.4"
	touch $@

test-compat: $(COMPAT)/.deps
	rm -rf $(COMPAT)/src && mkdir -p $(COMPAT)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents --preserve=timestamps -t $(COMPAT)/src
	cp -r $(COMPAT)/src/kernels $(COMPAT)/src/hcd_fast/kernels  # the installed layout (setup.py's package_dir)
	cd $(COMPAT)/src && ../bin/python setup.py -q build_ext --inplace --build-temp ../build-temp
	cd $(COMPAT)/src && TRITON_INTERPRET=1 PYTHONPATH=$$PWD ../bin/python -c "import torch, triton, numpy, hcd_fast; \
	  print('compat lane: torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__); \
	  assert hcd_fast.backends()['triton'].available, hcd_fast.backends()['triton'].reason"
	cd $(COMPAT)/src && PYTHONPATH=$$PWD ../bin/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf build *.egg-info hcd_fast/*.so
