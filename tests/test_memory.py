"""Memory requests from model size (montessori/memory.py): the parameter count from a config-sized
description, and the 8B preset's requests checked against the arithmetic of docs/cluster.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_helpers import ROOT

from montessori.config import load_config
from montessori.errors import ConfigError
from montessori.memory import KNOWN_SHAPES, ModelShape, job_memory_mb, model_shape, rule_memory_mb

# Llama-3-8B's config.json, the fields that size it (no weights).
LLAMA3_8B_CONFIG = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
# docs/cluster.md, "Memory requests" (computed): P = 8,030,261,248 parameters, 525,336,576 in the
# largest tensor (the embedding, 128256 x 4096); 6,000 MB per process; rounded up to whole GB.
LLAMA3_8B_PARAMETERS = 8_030_261_248
LLAMA3_8B_LARGEST = 128256 * 4096


def test_the_parameter_count_of_llama3_8b():
    shape = ModelShape.from_config(LLAMA3_8B_CONFIG, "Meta-Llama-3-8B/config.json")
    assert shape.parameters() == LLAMA3_8B_PARAMETERS
    assert shape.largest_tensor() == LLAMA3_8B_LARGEST
    assert KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"] == shape == KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]


@pytest.mark.parametrize("tied", [True, False])
def test_the_count_matches_a_real_model_built_from_the_same_config(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    shape = model_shape(str(tmp_path), "models.student")      # read from the directory's config.json
    assert shape.parameters() == sum(unique.values())
    assert shape.largest_tensor() == max(p.numel() for p in model.parameters())


def test_the_embedded_models_shape_is_its_config(smol_dir):
    config = json.loads((Path(smol_dir) / "config.json").read_text())
    assert ModelShape.from_config(config, "smollm2") == KNOWN_SHAPES["smollm2-135m-instruct"]


def test_the_8b_preset_requests_follow_the_arithmetic():
    config = load_config(ROOT / "config.yaml", ROOT / "presets" / "llama3-8b.yaml")
    processes = config["compute"]["training_gpus"]
    assert processes == 8 and config["sft"]["save_steps"] and "save_steps" not in config["dpo"]
    p, overhead = LLAMA3_8B_PARAMETERS, 6_000
    # influence: two fp32 moments of the largest tensor in flight, one process
    assert 2 * 4 * LLAMA3_8B_LARGEST == 4_202_692_608
    assert rule_memory_mb("influence", config) == 11_000           # 4,203 + 6,000 MB -> 11 GB
    # warm-up: fp32 weights + fp32 AdamW moments gathered on rank 0, 8 processes
    assert 12 * p == 96_363_134_976
    assert rule_memory_mb("warmup", config) == 145_000             # 96,364 + 48,000 MB -> 145 GB
    # SFT with checkpoints every 50 steps: the same gather
    assert rule_memory_mb("sft", config) == 145_000
    # DPO without checkpoints: policy and reference, fp32, on rank 0; dpo.gpus = 2 processes
    assert 8 * p == 64_242_089_984 and config["dpo"]["gpus"] == 2
    assert rule_memory_mb("dpo", config) == 77_000                 # 64,243 + 12,000 MB -> 77 GB
    # the NLL: the student's fp32 weights on the host while it loads, one process
    assert 4 * p == 32_121_044_992
    assert rule_memory_mb("nll", config) == 39_000                 # 32,122 + 6,000 MB -> 39 GB
    assert overhead * processes == 48_000


def test_requests_scale_with_processes_and_checkpoints():
    shape = KNOWN_SHAPES["TinyLlama/TinyLlama_v1.1"]
    one, eight = job_memory_mb("sft", shape, processes=1), job_memory_mb("sft", shape, processes=8)
    assert eight - one in (41_000, 42_000, 43_000)            # 7 more processes x 6,000 MB, rounded
    assert job_memory_mb("sft", shape, checkpoints=True) > job_memory_mb("sft", shape)
    assert job_memory_mb("dpo", shape, checkpoints=True) == job_memory_mb("warmup", shape)


def test_an_unknown_model_names_its_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    with pytest.raises(ConfigError, match=r"config key 'models\.teacher'.*someone/unknown-7b.*huggingface-cli download"):
        model_shape("someone/unknown-7b", "models.teacher")


def test_a_model_in_the_hub_cache_is_read_from_there(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--someone--cached-1b" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG | {"num_hidden_layers": 2}))
    (tmp_path / "hub" / "models--someone--cached-1b" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--cached-1b" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_shape("someone/cached-1b", "models.student").num_hidden_layers == 2


def test_a_transfer_student_is_sized_by_its_own_model():
    """presets/transfer.yaml's students: their SFT request is the main student's arithmetic on their shape."""
    config = load_config(ROOT / "config.yaml", ROOT / "presets" / "tinyllama.yaml", ROOT / "presets" / "transfer.yaml")
    processes = config["compute"]["training_gpus"]
    for index, student in enumerate(config["transfer_students"]):
        shape = model_shape(student["model"], "x")
        assert rule_memory_mb("sft", config, student["model"], f"transfer_students[{index}].model") == \
            job_memory_mb("sft", shape, processes=processes, checkpoints=True)
    # 7-9B students need several times the 1.1B main student's request
    gemma = KNOWN_SHAPES["google/gemma-2-9b"]
    assert 9.0e9 < gemma.parameters() < 9.5e9      # Gemma-2-9B: about 9.24 B parameters
    assert 7.0e9 < KNOWN_SHAPES["mistralai/Mistral-7B-v0.1"].parameters() < 7.3e9
    assert 7.5e9 < KNOWN_SHAPES["Qwen/Qwen1.5-7B"].parameters() < 7.8e9
    with pytest.raises(ConfigError, match=r"config key 'transfer_students\[0\]\.model'"):
        rule_memory_mb("sft", config, "someone/unknown-7b", "transfer_students[0].model")
