# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.syncnorm-installed
export OMP_NUM_THREADS ?= 1

.PHONY: demo test bench lint venv clean gpu-check gpu-bench

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
	rm -rf $(VENV) runs lightning_logs .pytest_cache

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
