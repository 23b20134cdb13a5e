# Quickstart: `make run` (set up, build, run the main job) and `make test` (set up, build, run the tests).
# `make demo` runs the merge demo.
# Everything lives in .venv; the extension builds against the torch installed there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CUDA sources compile whenever torch is a CUDA build and nvcc is found (see setup.py, LORM_EXT_CUDA).
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

.PHONY: setup build run demo test lint clean

$(VENV)/.requirements: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The editable install puts lorm_ext/_C*.so next to the sources; rebuilt when a source changes.
$(VENV)/.built: $(VENV)/.requirements $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

build: setup

# The main job: the embedded FCIL comparison (docs/fcil.md) of lorm, fedit, ffa-lora, lora-fair and
# centralized training on the MNIST digits shipped with the package; two single-threaded runs at a time.
run: setup
	$(PY) -m lorm_ext.fcil.cli --jobs 2

# End-to-end merge demo on generated data: per layer, the objective of averaging and of LoRM.
demo: setup
	$(PY) -m lorm_ext.demo

# Style: ruff (Python, ruff.toml) and clang-format (C++/CUDA, .clang-format); CI runs this before the tests.
CXX_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h csrc/include/lorm_ext/*.h tests/cpp/*.cpp)
lint: $(VENV)/.requirements
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf build lorm_ext/_C*.so *.egg-info $(VENV)/.built
