# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.syncnorm-installed
export OMP_NUM_THREADS ?= 1

.PHONY: demo test bench lint venv clean

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
