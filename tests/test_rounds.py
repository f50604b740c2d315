"""Rounds: round k+1 starts from round k's teacher and student, and a 2-round config runs."""

from __future__ import annotations

import json
import re

import pytest

from pipeline_helpers import LOCAL_CORES, TINY, make_workdir, read_jsonl, run_snakemake

TWO_ROUNDS = (*TINY, "tests/configs/two-rounds.yaml")
RESULTS = "results/two-rounds"
ROUND2_STUDENT = f"{RESULTS}/round2/montessori/student.done"


def job_inputs(dry_run_output: str, rule: str, wildcards: str) -> str:
    """The `input:` line of the planned job of `rule` with exactly these wildcards."""
    for block in re.split(r"\n(?:local)?rule ", dry_run_output):
        if block.startswith(f"{rule}:") and re.search(rf"\n\s+wildcards: {re.escape(wildcards)}\n", block):
            return re.search(r"\n\s+input: (.*)", block).group(1)
    raise AssertionError(f"no planned {rule} job with wildcards {wildcards}")


def test_round_two_is_wired_to_round_one_models(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    dry = run_snakemake(workdir, "-n", ROUND2_STUDENT, *TWO_ROUNDS)
    assert dry.returncode == 0, dry.stdout[-4000:]
    out = dry.stdout
    assert f"{RESULTS}/round1/teacher.done" in job_inputs(out, "synth_instructions", "k=2, set=probes, shard=0")
    assert f"{RESULTS}/round1/montessori/student.done" in job_inputs(out, "warmup", "k=2")
    assert f"{RESULTS}/round1/teacher.done" in job_inputs(out, "dpo_teacher", "k=2")
    assert f"{RESULTS}/round2/teacher.done" in job_inputs(out, "synth_instructions",
                                                          "k=2, set=montessori/train, shard=0")
    assert f"{RESULTS}/round1/montessori/student.done" in job_inputs(out, "sft_student", "k=2, method=montessori")


@pytest.mark.slow
def test_two_rounds_run(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    run = run_snakemake(workdir, *LOCAL_CORES, ROUND2_STUDENT, *TWO_ROUNDS, timeout=2400,
                        log=workdir / "snakemake.log")
    assert run.returncode == 0, run.stdout[-6000:]
    for k in (1, 2):
        assert read_jsonl(workdir / f"{RESULTS}/round{k}/pairs.jsonl")
        assert (workdir / f"{RESULTS}/round{k}/teacher/model.safetensors").exists()
    probes_round2 = read_jsonl(workdir / f"{RESULTS}/round2/probes/instructions.jsonl")
    assert probes_round2 and all(r["id"].startswith("r2-probes") for r in probes_round2)
    card = json.loads((workdir / ROUND2_STUDENT).read_text())
    assert card["path"].endswith("round2/montessori/student")
    assert (workdir / card["path"] / "model.safetensors").exists()
