"""Throughput settings: how fast a stage runs, never what it writes.

Snakemake reruns a job when its `params` change, so a rule's `--settings` (a param) holds only the
keys that decide its outputs. The keys below change speed and memory only: they travel in
`--runtime` (a JSON built from the config outside the params, see rules/common.smk), which the
CLI merges into the stage's settings. Changing one of them therefore plans no job.

A key belongs here only if the outputs do not depend on it; tests/test_generation.py and
tests/test_synthesis.py check that for the batch sizes.
"""

from __future__ import annotations

import copy

# config section -> its throughput keys
THROUGHPUT_KEYS: dict[str, tuple[str, ...]] = {
    "synthesis": ("batch_size", "gpu_memory_utilization", "api_concurrency"),
    # batch_size is the reference forward's batch: the pooled loss (sum over every token / token
    # count) does not depend on it. A per-batch mean would: see influence_throughput_keys.
    "influence": ("batch_size", "gpus_per_shard"),
    "evaluation.lm_eval": ("batch_size",),
    # the NLL's forward batch: each record's loss is summed on its own (evaluation/nll.py)
    "evaluation.nll": ("batch_size",),
    # where the training stages also send their logs (TensorBoard, W&B): never what they write
    "logging": ("report_to",),
}

# Stages that train with a transformers/TRL trainer: they read `logging`.
TRAINING_STAGES = ("warmup", "sft_student", "dpo_teacher")

# Stages whose model generates through montessori.generation: the generator's batch and vLLM's
# memory share come from the synthesis section.
GENERATING_STAGES = ("synth_instructions", "synth_responses", "eval_generate", "eval_judge", "judge_probes",
                     "self_reward_candidates", "self_reward_judge", "llm2llm_augment")


def _section(config: dict, dotted: str) -> dict:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def influence_throughput_keys(config: dict) -> tuple[str, ...]:
    """influence.batch_size is result-bearing when the loss is averaged per batch (a mean of batch
    means depends on where the batches cut), and throughput only for the pooled loss."""
    aggregation = config["influence"].get("loss_aggregation", "pooled")
    keys = THROUGHPUT_KEYS["influence"]
    return keys if aggregation == "pooled" else tuple(key for key in keys if key != "batch_size")


def throughput_keys(config: dict, dotted: str) -> tuple[str, ...]:
    if dotted == "influence":
        return influence_throughput_keys(config)
    return THROUGHPUT_KEYS.get(dotted, ())


def result_section(config: dict, dotted: str, drop: tuple[str, ...] = ()) -> dict:
    """A config section without its throughput keys (and without `drop`): what a stage's
    `--settings` may hold."""
    removed = set(throughput_keys(config, dotted)) | set(drop)
    return {key: copy.deepcopy(value) for key, value in _section(config, dotted).items() if key not in removed}


def runtime_settings(config: dict) -> dict[str, dict]:
    """stage -> the throughput settings it reads (an empty dict for a stage that reads none)."""
    synthesis = config["synthesis"]
    generation = {"batch_size": synthesis["batch_size"], "gpu_memory_utilization": synthesis["gpu_memory_utilization"]}
    stages: dict[str, dict] = {stage: dict(generation) for stage in GENERATING_STAGES}
    for stage in ("synth_instructions", "synth_responses"):
        stages[stage]["api_concurrency"] = synthesis["api_concurrency"]
    stages["influence"] = {key: config["influence"][key] for key in influence_throughput_keys(config)}
    for stage in TRAINING_STAGES:
        stages[stage] = {"logging": {"report_to": config["logging"]["report_to"]}}
    stages["eval_score"] = {
        "gpu_memory_utilization": synthesis["gpu_memory_utilization"],
        "lm_eval": {"batch_size": config["evaluation"]["lm_eval"]["batch_size"]},
        "nll": {"batch_size": config["evaluation"]["nll"]["batch_size"]},
    }
    return stages


def merge_runtime(settings: dict, runtime: dict) -> dict:
    """The stage's settings with its throughput settings merged in (nested sections key by key).
    A key in both would mean a throughput key leaked into the params: refused."""
    merged = dict(settings)
    for key, value in runtime.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_runtime(merged[key], value)
        elif key in merged:
            raise ValueError(f"settings key '{key}' is both a result setting and a runtime (throughput) setting")
        else:
            merged[key] = value
    return merged
