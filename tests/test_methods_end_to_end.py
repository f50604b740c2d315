"""Every method of the paper's Table 1 in one tiny run: `methods: [montessori, self_instruct,
self_reward, llm2llm]`, with the teacher-optimization switch at `dpo_responses` and Self-Reward's
self judge. One run, read by every test here (each method's own unit and dry-run tests are in its
module), so that the suite pays for one pipeline, not one per method; on the random model of
tests/configs/random-model.yaml, since these tests read what each method's jobs wrote, not what
a model said."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from pipeline_helpers import (END_TO_END_TIMEOUT, LOCAL_CORES, ROOT, TINY_RANDOM_MODEL, FinishedRun, make_workdir,
                              read_jsonl, run_snakemake)

from montessori.config import load_config
from montessori.llm2llm import default_seed_size

pytestmark = pytest.mark.slow

METHODS = ["montessori", "self_instruct", "self_reward", "llm2llm"]
OVERRIDE = {
    "run": "tiny-methods",
    "methods": METHODS,
    "teacher_optimization": "dpo_responses",
    "self_reward": {"judge": "self", "n": 2, "sampling": {"max_new_tokens": 24}},
}


@pytest.fixture(scope="module")
def methods_run(module_tmp, tiny_model_dir) -> FinishedRun:
    workdir = make_workdir(module_tmp / "work")
    (workdir / "methods.yaml").write_text(yaml.safe_dump(OVERRIDE))
    run = run_snakemake(workdir, *LOCAL_CORES, *TINY_RANDOM_MODEL, "methods.yaml", timeout=END_TO_END_TIMEOUT,
                        log=workdir / "snakemake.log")
    assert run.returncode == 0, run.stdout[-6000:]
    return FinishedRun(workdir)


def results_of(run: FinishedRun):
    return run.workdir / "results" / OVERRIDE["run"]


def config_of(run: FinishedRun) -> dict:
    return load_config(ROOT / "config.yaml", *(ROOT / path for path in TINY_RANDOM_MODEL[1:]), run.workdir / "methods.yaml")


def test_the_report_has_one_row_per_method(methods_run):
    with (results_of(methods_run) / "report.csv").open(newline="") as handle:
        rows = {row["student"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"base"} | {f"{method}-round1" for method in METHODS}
    for student, row in rows.items():
        assert row["nll.nll"] != "", student
        assert any(value for key, value in row.items() if key.startswith("mt_bench.")), student
    report = (results_of(methods_run) / "report.md").read_text()
    assert "Teacher optimization: `dpo_responses`" in report


def test_dpo_responses_pairs_answers_to_one_instruction(methods_run):
    results = results_of(methods_run)
    n = config_of(methods_run)["synthesis"]["n"]
    by_instruction: dict[str, list[dict]] = {}
    for record in read_jsonl(results / "round1/probes/responses.jsonl"):
        by_instruction.setdefault(record["instruction_id"], []).append(record)
    assert all(len(group) == n and {r["group"] for r in group} == {iid} for iid, group in by_instruction.items())
    pairs = read_jsonl(results / "round1/pairs.jsonl")
    probing = {r["id"]: r for r in read_jsonl(results / "round1/probes/probing.jsonl")}
    assert pairs
    for one in pairs:
        chosen, rejected = probing[one["chosen_id"]], probing[one["rejected_id"]]
        assert chosen["instruction_id"] == rejected["instruction_id"] == one["group"]
        assert one["prompt"] == chosen["prompt"] and one["chosen"] == chosen["raw_output"]
        assert one["rejected"] == rejected["raw_output"]
    assert json.loads((results / "round1/teacher.done").read_text()).get("stage") == "dpo"


def test_self_reward_student_answers_judges_and_trains_itself(methods_run):
    results = results_of(methods_run)
    card = json.loads((results / "round1/self_reward/student.done").read_text())
    assert card["path"].endswith("round1/self_reward/student")
    assert (methods_run.workdir / card["path"] / "model.safetensors").exists()
    candidates = read_jsonl(results / "round1/self_reward/candidates.jsonl")
    instructions = read_jsonl(results / "round1/self_reward/train/instructions.jsonl")
    assert len(candidates) == OVERRIDE["self_reward"]["n"] * len(instructions)
    assert read_jsonl(results / "round1/self_reward/pairs.jsonl")
    assert not (results / "round1/self_reward/train/responses.jsonl").exists()


def test_llm2llm_augments_its_hardest_seeds_and_retrains(methods_run):
    results = results_of(methods_run)
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
