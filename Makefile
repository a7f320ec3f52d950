# The two set-up commands of README.md. Each creates .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out

.PHONY: install demo test test-fast lint gpu-wheels
install:
	VENV=$(VENV) bash scripts/install.sh

demo: install
	rm -rf $(DEMO_OUT)
	RAY_AUTH_MODE=disabled $(VENV)/bin/vlmixer demo --out $(DEMO_OUT)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q tests

# the quick loop while editing: everything but the end-to-end tests marked `slow` (CI runs all)
test-fast: install lint
	$(PY) -m pytest -q -m "not slow" tests

# the wheels a bare GPU machine (Python 3.12, torch 2.11) lacks, into .whl/ (ignored by git, < 64 MiB):
# bench/gpu_check.sh installs them there. Needs only pip and the package registry, not .venv.
GPU_PY ?= python3
gpu-wheels:
	$(GPU_PY) bench/gpu/wheels.py download --dir .whl
