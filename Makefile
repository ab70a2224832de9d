# mmfast: the two commands of README.
#   make train   set up .venv if needed, then run the main job
#   make test    set up .venv if needed, then lint and run the test suite
#
# Variables:
#   PYTHON=python3                       interpreter used to create the venv
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"   what to install when the venv has no torch
#   USE_SYSTEM_TORCH=1                   create the venv with --system-site-packages and use the
#                                        torch already installed for $(PYTHON)
#   MMFAST_CUDA=auto|0|1, MAX_JOBS=N     passed to the extension build (see setup.py)
#   PYTEST_ARGS=...                      extra pytest arguments

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
BIN := $(VENV)/bin
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: train test lint bench info clean gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(if $(USE_SYSTEM_TORCH),--system-site-packages) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=69" wheel ninja

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	touch $@

# The editable install compiles mmfast._C against the venv's torch (no build isolation).
$(VENV)/.mmfast: $(VENV)/.torch $(SOURCES)
	$(BIN)/python -m pip install --no-build-isolation -e ".[test,bench,train]"
	$(BIN)/python -m mmfast.info
	touch $@

train: $(VENV)/.mmfast
	$(BIN)/python -m mmfast.train

test: $(VENV)/.mmfast
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.mmfast
	$(BIN)/ruff check .

bench: $(VENV)/.mmfast
	$(BIN)/python -m mmfast.bench contrastive

info: $(VENV)/.mmfast
	$(BIN)/python -m mmfast.info

clean:
	rm -rf build mmfast/_C*.so $(VENV)/.mmfast

# Wheels the offline GPU machine lacks (open_clip for the baselines, and ftfy and wcwidth, which its
# import needs). Fetch them here, then pass carry=["benchmarks/wheels"] to the device run;
# benchmarks/gpu_check.sh installs them --no-deps.
gpu-wheels: $(BIN)/python
	$(BIN)/python -m pip download --no-deps -d benchmarks/wheels open-clip-torch==3.3.0 ftfy wcwidth
