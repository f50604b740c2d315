"""Rounds: round k+1 starts from round k's teacher and student, and raising `rounds` on a finished
run adds the next round without redoing the first."""

from __future__ import annotations

import json
import re

import pytest

from pipeline_helpers import (
    LOCAL_CORES,
    SHARED_RUN_CONFIG,
    TINY,
    TINY_RESULTS,
    FinishedRun,
    make_workdir,
    output_mtimes,
    planned_jobs,
    read_jsonl,
    run_snakemake,
)

TWO_ROUNDS = "tests/configs/two-rounds.yaml"
RESULTS = TINY_RESULTS
ROUND2_STUDENT = f"{RESULTS}/round2/montessori/student.done"


def job_inputs(dry_run_output: str, rule: str, wildcards: str) -> str:
    """The `input:` line of the planned job of `rule` with exactly these wildcards."""
    for block in re.split(r"\n(?:local)?rule ", dry_run_output):
        if block.startswith(f"{rule}:") and re.search(rf"\n\s+wildcards: {re.escape(wildcards)}\n", block):
            return re.search(r"\n\s+input: (.*)", block).group(1)
    raise AssertionError(f"no planned {rule} job with wildcards {wildcards}")


def test_round_two_is_wired_to_round_one_models(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    dry = run_snakemake(workdir, "-n", ROUND2_STUDENT, *TINY, TWO_ROUNDS)
    assert dry.returncode == 0, dry.stdout[-4000:]
    out = dry.stdout
    assert f"{RESULTS}/round1/teacher.done" in job_inputs(out, "synth_instructions", "k=2, set=probes, shard=0")
    assert f"{RESULTS}/round1/montessori/student.done" in job_inputs(out, "warmup", "k=2")
    assert f"{RESULTS}/round1/teacher.done" in job_inputs(out, "dpo_teacher", "k=2")
    assert f"{RESULTS}/round2/teacher.done" in job_inputs(out, "synth_instructions",
                                                          "k=2, set=montessori/train, shard=0")
    assert f"{RESULTS}/round1/montessori/student.done" in job_inputs(out, "sft_student", "k=2, method=montessori")


@pytest.mark.slow
def test_a_second_round_extends_a_finished_run(tiny_run_copy: FinishedRun):
    workdir = tiny_run_copy.workdir
    round1 = output_mtimes(workdir, f"{RESULTS}/round1")
    # Over the shared run's own config files (the random model).
    run = run_snakemake(workdir, *LOCAL_CORES, ROUND2_STUDENT, *SHARED_RUN_CONFIG, TWO_ROUNDS, timeout=2400,
                        log=workdir / "snakemake-round2.log")
    assert run.returncode == 0, run.stdout[-6000:]
    planned_rounds = {job.wildcards.get("k") for job in planned_jobs(run.stdout)}
    assert planned_rounds == {"2"}, f"adding round 2 planned jobs of rounds {planned_rounds}"
    assert output_mtimes(workdir, f"{RESULTS}/round1") == round1, "round 1 outputs were written again"

    for k in (1, 2):
        assert read_jsonl(workdir / f"{RESULTS}/round{k}/pairs.jsonl")
        assert (workdir / f"{RESULTS}/round{k}/teacher/model.safetensors").exists()
    probes_round2 = read_jsonl(workdir / f"{RESULTS}/round2/probes/instructions.jsonl")
    assert probes_round2 and all(r["id"].startswith("r2-probes") for r in probes_round2)
    card = json.loads((workdir / ROUND2_STUDENT).read_text())
    assert card["path"].endswith("round2/montessori/student")
    assert (workdir / card["path"] / "model.safetensors").exists()
