"""`python -m montessori STAGE --settings JSON [--runtime JSON] --key value ...`: the one entry point rules call.

`--settings` holds what decides the stage's outputs (a Snakemake param: a change reruns the job);
`--runtime` the throughput settings (batch sizes, vLLM memory share, ...; see montessori.runtime),
merged into the settings.

A stage is a function `fn(settings: dict, **kwargs)`. `--key value` becomes `key=value` (dashes
to underscores); a value that parses as a JSON number, bool or null becomes that; a key given
several values, or any key ending in `_paths`, becomes a list.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time

from .errors import MontessoriError
from .runtime import merge_runtime

STAGES = {
    "prepare_model": "montessori.models:prepare_model_stage",
    "seed_pool": "montessori.data:build_seed_pool",
    "reference_set": "montessori.data:build_reference_set",
    "synth_instructions": "montessori.synthesis:synthesize_instructions",
    "merge_instructions": "montessori.synthesis:merge_instructions",
    "synth_responses": "montessori.synthesis:synthesize_responses",
    "merge_responses": "montessori.synthesis:merge_responses",
    "split_probes": "montessori.synthesis:split_probes",
    "warmup": "montessori.training:warmup",
    "influence": "montessori.influence:score_shard",
    "merge_influence": "montessori.influence:merge_influence",
    "judge_probes": "montessori.probe_judge:judge_probes",
    "preference_pairs": "montessori.pairs:build_pairs",
    "dpo_teacher": "montessori.training:train_dpo",
    "bootstrap_set": "montessori.teacheropt:build_bootstrap_set",
    "bootstrap_teacher": "montessori.teacheropt:train_bootstrap",
    "sft_student": "montessori.training:train_sft",
    "self_reward_candidates": "montessori.self_reward:generate_candidates",
    "self_reward_judge": "montessori.self_reward:self_judge",
    "llm2llm_seeds": "montessori.llm2llm:build_seed_set",
    "llm2llm_hard_examples": "montessori.llm2llm:score_seed_examples",
    "llm2llm_augment": "montessori.llm2llm:augment",
    "llm2llm_training_set": "montessori.llm2llm:build_training_set",
    "eval_generate": "montessori.evaluation.jobs:generate",
    "eval_score": "montessori.evaluation.jobs:score",
    "eval_judge": "montessori.evaluation.jobs:judge",
    "analysis_figures": "montessori.figures:draw_analysis_figures",
    "report": "montessori.report:build_report",
}


def _value(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def parse_args(argv: list[str]) -> tuple[str, dict, dict]:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in STAGES:
        stages = "\n  ".join(STAGES)
        raise SystemExit(f"usage: python -m montessori STAGE --settings JSON [--runtime JSON] [--key value ...]\n"
                         f"       python -m montessori install-profile [--force]\nstages:\n  {stages}")
    stage, rest = argv[0], argv[1:]
    kwargs: dict[str, list] = {}
    key = None
    for token in rest:
        if token.startswith("--"):
            key = token[2:].replace("-", "_")
            kwargs.setdefault(key, [])
        elif key is None:
            raise SystemExit(f"unexpected argument {token!r}: values follow a --key")
        else:
            kwargs[key].append(token)
    settings = merge_runtime(json.loads(kwargs.pop("settings", ["{}"])[0]),
                             json.loads(kwargs.pop("runtime", ["{}"])[0]))
    parsed = {}
    for key, values in kwargs.items():
        if key.endswith("_paths") or len(values) > 1:
            parsed[key] = [_value(v) for v in values]
        elif values:
            parsed[key] = _value(values[0])
        else:
            parsed[key] = True
    return stage, settings, parsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-profile"]:
        # Not a stage: a one-off setup command for users (docs/cluster.md), no --settings.
        from .cluster import install_profile_main

        return install_profile_main(argv[1:])
    stage, settings, kwargs = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s [{stage}] %(levelname)s %(name)s: %(message)s",
    )
    module_name, func_name = STAGES[stage].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    started = time.time()
    logging.getLogger("montessori").info("stage %s starting with %s", stage, kwargs)
    try:
        func(settings, **kwargs)
    except MontessoriError as err:
        logging.getLogger("montessori").error("%s", err)
        print(f"error in stage {stage}: {err}", file=sys.stderr)
        return 2
    logging.getLogger("montessori").info("stage %s done in %.1f s", stage, time.time() - started)
    return 0
