"""Throughput settings travel outside the params Snakemake compares (montessori.runtime)."""

from __future__ import annotations

import pytest

from montessori.cli import parse_args
from montessori.config import load_config
from montessori.runtime import THROUGHPUT_KEYS, merge_runtime, result_section, runtime_settings
from conftest import ROOT


@pytest.fixture()
def config() -> dict:
    return load_config(ROOT / "config.yaml")


def test_result_sections_hold_no_throughput_key(config):
    for dotted, keys in THROUGHPUT_KEYS.items():
        section = result_section(config, dotted)
        assert not set(keys) & set(section), dotted
    assert "reference" not in result_section(config, "influence", drop=("reference",))
    assert result_section(config, "synthesis")["n"] == config["synthesis"]["n"]


def test_each_stage_gets_the_throughput_settings_it_reads(config):
    runtime = runtime_settings(config)
    synthesis = config["synthesis"]
    assert runtime["synth_instructions"] == {"batch_size": synthesis["batch_size"], "api_concurrency": synthesis["api_concurrency"],
                                             "gpu_memory_utilization": synthesis["gpu_memory_utilization"]}
    for stage in ("eval_generate", "eval_judge"):
        assert runtime[stage] == {"batch_size": synthesis["batch_size"],
                                  "gpu_memory_utilization": synthesis["gpu_memory_utilization"]}, stage
    assert runtime["influence"] == {"batch_size": config["influence"]["batch_size"],
                                    "gpus_per_shard": config["influence"]["gpus_per_shard"]}
    assert runtime["eval_score"] == {"gpu_memory_utilization": synthesis["gpu_memory_utilization"],
                                     "lm_eval": {"batch_size": config["evaluation"]["lm_eval"]["batch_size"]},
                                     "nll": {"batch_size": config["evaluation"]["nll"]["batch_size"]}}
    for stage in ("warmup", "sft_student", "dpo_teacher"):
        assert runtime[stage] == {"logging": {"report_to": config["logging"]["report_to"]}}, stage
    assert "report" not in runtime and "analysis_figures" not in runtime


def test_training_logging_is_runtime_not_a_result(config):
    """logging.report_to changes where the trainers also send their logs, not what they write:
    it reaches the training stages through --runtime, and no stage's --settings."""
    config["logging"]["report_to"] = "tensorboard"
    assert result_section(config, "logging") == {}
    assert runtime_settings(config)["dpo_teacher"]["logging"] == {"report_to": "tensorboard"}
    _, settings, _ = parse_args(["dpo_teacher", "--settings", '{"beta": 0.1, "seed": 42}',
                                 "--runtime", '{"logging": {"report_to": "tensorboard"}}'])
    assert settings == {"beta": 0.1, "seed": 42, "logging": {"report_to": "tensorboard"}}


def test_a_per_batch_mean_makes_the_influence_batch_result_bearing(config):
    config["influence"]["loss_aggregation"] = "batch_mean"
    assert "batch_size" not in runtime_settings(config)["influence"]
    assert result_section(config, "influence")["batch_size"] == config["influence"]["batch_size"]


def test_the_cli_merges_runtime_into_settings():
    _, settings, _ = parse_args(["eval_score", "--settings", '{"seed": 1, "lm_eval": {"limit": 2}}',
                                 "--runtime", '{"gpu_memory_utilization": 0.5, "lm_eval": {"batch_size": 8}}'])
    assert settings == {"seed": 1, "gpu_memory_utilization": 0.5, "lm_eval": {"limit": 2, "batch_size": 8}}
    with pytest.raises(ValueError, match="'batch_size' is both"):
        merge_runtime({"batch_size": 4}, {"batch_size": 8})
