# Quick start:  `make demo` runs the main job, `make test` runs the tests.
# Each target sets up what it needs: a virtual environment in $(VENV) with torch and the
# dependencies, and etc-ext built from source against that torch (CPU kernels always, CUDA
# kernels too when torch has CUDA and nvcc is found).
#
#   make test TORCH="torch==2.13.0"      pick the torch to install (default: newest allowed)
#   make test ETC_EXT_CUDA=0             skip the CUDA kernels (faster build)
#   make bench                           op benchmarks: table, JSON and plot under outputs/

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := ninja numpy tqdm pytest pytest-benchmark expecttest hypothesis \
        transformers peft safetensors pillow matplotlib

.PHONY: demo test bench install clean

$(VENV)/.deps-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "setuptools>=77" wheel
	$(PIP) install "$(TORCH)"
	$(PIP) install $(DEPS)
	touch $@

# Editable install: the compiled etc_ext/_C lands in the source tree, so tests and examples
# run from here import the freshly built module.
$(VENV)/.built: $(VENV)/.deps-installed setup.py $(shell find csrc -type f 2>/dev/null)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) scripts/check_build.py
	touch $@

install: $(VENV)/.built

# The offline demo: ETC vs the full model and training-free compressors on the shipped tiny LLaVA
# (table on stdout; plot and json under outputs/demo). Minutes on a CPU, nothing downloaded.
demo: install
	$(VENV)/bin/etc-ext demo --output outputs/demo --json outputs/demo/demo.json

test: install
	$(PY) -m pytest python_tests -q -p no:cacheprovider

bench: install
	$(PY) bench/run.py

clean:
	rm -rf build $(VENV) etc_ext/*.so *.egg-info
