# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.syncnorm-installed
export OMP_NUM_THREADS ?= 1

.PHONY: demo test bench lint venv clean gpu-check gpu-bench test-device-torch

venv: $(STAMP)

$(STAMP): pyproject.toml syncnorm/csrc/norm_cpu.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	-$(PY) -m syncnorm.cli build-ext
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m syncnorm.launch examples/detection/train.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m syncnorm.cli bench

lint: $(STAMP)
	$(PY) -m compileall -q syncnorm tests benchmarks examples

clean:
	rm -rf $(VENV) $(DEVICE_VENV) runs lightning_logs .pytest_cache

# The GPU machine has an older torch (2.11) than `make test` installs. Before spending device time, check on CPU that
# the code the GPU runs still works there: a second venv with that torch (and numpy < 2.3: the Triton 3.6 it brings
# interprets kernels with calls that numpy 2.4 rejects), and the tests of torch.compile, the Triton kernels
# (interpreted), the host-read probe, the deferred checks, tests/test_cuda.py's logic on CPU tensors and the GPU
# benchmark's quick CPU run. Not part of `make test` (it adds about 5 minutes with the install).
DEVICE_TORCH ?= 2.11.*
DEVICE_VENV := .venv-device-torch
test-device-torch:
	test -x $(DEVICE_VENV)/bin/python || $(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install --quiet "torch==$(DEVICE_TORCH)" "numpy<2.3" pytest pytest-timeout \
		hypothesis "pytorch-lightning>=2.2" torchvision
	$(DEVICE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(DEVICE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_triton.py \
		tests/test_host_sync.py tests/test_stats.py tests/test_bench_gpu.py
	SYNCNORM_TEST_DEVICE=cpu $(DEVICE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_cuda.py

# The ONE prepared command for a machine with a GPU: tests/test_cuda.py with its preinstalled $(PYTHON) (no venv, no pip,
# no C++ build), under a timeout; `make gpu-check OUT=$OUT` also writes the log to $(OUT)/gpu_check.log.
GPU_CHECK_TIMEOUT ?= 300
gpu-check: SHELL := /bin/bash
gpu-check: .SHELLFLAGS := -o pipefail -c
gpu-check:
	$(if $(OUT),mkdir -p "$(OUT)")
	SYNCNORM_CPU_EXT=0 OMP_NUM_THREADS=1 timeout -k 10 $(GPU_CHECK_TIMEOUT) \
		$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee $(if $(OUT),"$(OUT)/gpu_check.log",/dev/null)

# The GPU benchmark (benchmarks/bench_gpu.py: per-layer and training-step ratio tables, host syncs, compile) with the
# preinstalled $(PYTHON), under a time budget of 220 s; `make gpu-bench OUT=$OUT` writes $(OUT)/bench_gpu.md.
GPU_BENCH_TIMEOUT ?= 280
gpu-bench:
	$(if $(OUT),mkdir -p "$(OUT)")
	OMP_NUM_THREADS=1 timeout -k 10 $(GPU_BENCH_TIMEOUT) $(PYTHON) -m benchmarks.bench_gpu --budget-s 220 \
		$(if $(OUT),--out "$(OUT)/bench_gpu.md")
