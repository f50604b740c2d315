"""Every method of the paper's Table 1 in one tiny run: `methods: [montessori, self_instruct,
self_reward, llm2llm]`, with Self-Reward's self judge. The session's finished run (montessori and
self_instruct, pipeline_helpers.SHARED_RUN_CONFIG: the random model) is copied and extended by the
two other methods, so that the suite pays only for their jobs, and the extension must leave the
copied run's jobs alone. Read by every test here (each method's own unit and dry-run tests are in
its module). The teacher-optimization switch `dpo_responses` runs end to end in
tests/test_slurm_pipeline.py."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from pipeline_helpers import (END_TO_END_TIMEOUT, LOCAL_CORES, SHARED_RUN_CONFIG, TINY_RESULTS, FinishedRun,
                              copy_of_run, merged_config, output_mtimes, read_jsonl, run_snakemake)

from montessori.llm2llm import default_seed_size

pytestmark = pytest.mark.slow

METHODS = ["montessori", "self_instruct", "self_reward", "llm2llm"]
OVERRIDE = {
    "methods": METHODS,
    "self_reward": {"judge": "self", "n": 2, "sampling": {"max_new_tokens": 24}},
}
# What the shared run already finished: extending it by two methods must not write it again.
SHARED_OUTPUTS = ("round1/probes", "round1/influence", "round1/montessori", "round1/self_instruct", "eval/base",
                  "eval/montessori-round1", "eval/self_instruct-round1")


@pytest.fixture(scope="module")
def methods_run(finished_tiny_run, module_tmp) -> FinishedRun:
    run = FinishedRun(copy_of_run(finished_tiny_run, module_tmp / "work"))
    (run.workdir / "methods.yaml").write_text(yaml.safe_dump(OVERRIDE))
    before = {path: output_mtimes(run.workdir, f"{TINY_RESULTS}/{path}") for path in SHARED_OUTPUTS}
    snakemake = run_snakemake(run.workdir, *LOCAL_CORES, *SHARED_RUN_CONFIG, "methods.yaml",
                              timeout=END_TO_END_TIMEOUT, log=run.workdir / "snakemake-methods.log")
    assert snakemake.returncode == 0, snakemake.stdout[-6000:]
    for path, mtimes in before.items():
        assert mtimes and output_mtimes(run.workdir, f"{TINY_RESULTS}/{path}") == mtimes, \
            f"{path}: outputs of the finished run were written again"
    return run


def config_of(run: FinishedRun) -> dict:
    return merged_config(SHARED_RUN_CONFIG, run.workdir / "methods.yaml")


def test_the_report_has_one_row_per_method(methods_run):
    with (methods_run.results / "report.csv").open(newline="") as handle:
        rows = {row["student"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"base"} | {f"{method}-round1" for method in METHODS}
    for student, row in rows.items():
        assert row["nll.nll"] != "", student
        assert any(value for key, value in row.items() if key.startswith("mt_bench.")), student


def test_self_reward_student_answers_judges_and_trains_itself(methods_run):
    results = methods_run.results
    card = json.loads((results / "round1/self_reward/student.done").read_text())
    assert card["path"].endswith("round1/self_reward/student")
    assert (methods_run.workdir / card["path"] / "model.safetensors").exists()
    candidates = read_jsonl(results / "round1/self_reward/candidates.jsonl")
    instructions = read_jsonl(results / "round1/self_reward/train/instructions.jsonl")
    assert len(candidates) == OVERRIDE["self_reward"]["n"] * len(instructions)
    assert read_jsonl(results / "round1/self_reward/pairs.jsonl")
    assert not (results / "round1/self_reward/train/responses.jsonl").exists()


def test_llm2llm_augments_its_hardest_seeds_and_retrains(methods_run):
    results = methods_run.results
    config = config_of(methods_run)
    seed_size = default_seed_size(config["train_set"]["size"])
    seeds = read_jsonl(results / "round0/llm2llm/seeds/responses.jsonl")
    assert len(seeds) == seed_size and all("response" in record for record in seeds)
    hard = read_jsonl(results / "round1/llm2llm/hard.jsonl")
    assert len(hard) == math.ceil(seed_size * config["llm2llm"]["hard_fraction"])
    summary = json.loads((results / "round1/llm2llm/hard_summary.json").read_text())
    assert sorted(summary["losses"]) == sorted(record["id"] for record in seeds)
    assert hard[0]["loss"] == max(summary["losses"].values())
    added = read_jsonl(results / "round1/llm2llm/augment/responses.jsonl")
    assert {record["from_seed"] for record in added} <= {record["id"] for record in hard}
    training = read_jsonl(results / "round1/llm2llm/train/responses.jsonl")
    assert [record["id"] for record in training] == [r["id"] for r in seeds] + [r["id"] for r in added]
    card = json.loads((results / "round1/llm2llm/student.done").read_text())
    assert (methods_run.workdir / card["path"] / "model.safetensors").exists()
