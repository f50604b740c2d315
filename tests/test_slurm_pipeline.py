"""The pipeline itself on a real SLURM: the tiny config, every rule kind (generation and influence
shards, merges, training, evaluation, the report), submitted with `sbatch` on the one-node
loopback cluster of tests/slurm_cluster.py through our site profile as users run it: installed
with `python -m montessori install-profile` into a temporary user config folder, then
`snakemake --profile slurm` literally.

The config asks for one GPU per job (`compute.gpus`, `compute.training_gpus`), so GPU rules keep
their GPU requests and are scheduled on the node's fake typed GPUs; nothing runs on a GPU. The
models are the random one of tests/configs/random-model.yaml: what is checked here is the
scheduling, not what a model says. The teacher is optimized with `teacher_optimization:
dpo_responses` (the session's shared run has the default, dpo_instructions): the switch runs end
to end here, in the same number of jobs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml
from pipeline_helpers import (
    TINY_RANDOM_MODEL,
    TINY_RESULTS,
    make_workdir,
    merged_config,
    pipeline_env,
    planned_jobs,
    read_jsonl,
    run_snakemake,
)
from slurm_cluster import LOOPBACK_OVERRIDES, SUBMITTED, slurm_cluster  # noqa: F401 (fixture)

# One GPU per job (`compute.gpus`, `compute.training_gpus`). Every rule kind once, in as few jobs
# as cover them: one method (the Self-Instruct baseline adds only jobs of the same rules), one
# shard per generation and influence step (a second shard is the same rule again; the shard
# merges still run, over one shard).
SLURM_RUN = {"compute": {"gpus": 1, "training_gpus": 1}, "methods": ["montessori"],
             "teacher_optimization": "dpo_responses",
             "synthesis": {"shards": 1}, "influence": {"shards": 1},
             "evaluation": {"alpaca_eval": {"reference": "dataset"}}}   # no Self-Instruct student to judge against
RULE_KINDS = {
    "generation shard": {"synth_instructions", "synth_responses"},
    "influence shard": {"influence"},
    "training": {"warmup", "dpo_teacher", "sft_student"},
    "evaluation": {"eval_generate", "eval_score", "eval_judge"},
}
# Jobs of seconds are `localrules` (rules/common.smk): Snakemake runs them itself, never queued.
LOCAL_KINDS = {
    "merge": {"merge_instructions", "merge_responses", "merge_influence"},
    "report": {"analysis_figures", "report"},
}
RUN_TIMEOUT = 2400
MB_PER_UNIT = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}


def tres_mem_mb(tres: str) -> float:
    """The memory in a job record's TRES (`mem=32000M`, `mem=62.50G`), in MB."""
    match = re.search(r"\bmem=([\d.]+)([KMGT])", tres)
    assert match, f"no memory in TRES {tres!r}"
    return float(match[1]) * MB_PER_UNIT[match[2]]


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, module_tmp, tiny_model_dir):  # noqa: F811 (fixture)
    cluster = slurm_cluster
    workdir = make_workdir(module_tmp / "work")
    (workdir / "slurm-run.yaml").write_text(yaml.safe_dump(SLURM_RUN))
    # The site's variables and a clean GPU environment from the cluster, the venv first on PATH,
    # and a user config folder of its own, where install-profile puts our profile as `slurm`.
    env = cluster.env() | {key: pipeline_env()[key] for key in ("PATH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    env["XDG_CONFIG_HOME"] = str(module_tmp / "user-config")
    install = subprocess.run([sys.executable, "-m", "montessori", "install-profile"], check=False, cwd=workdir,
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert install.returncode == 0, install.stdout
    started = time.monotonic()
    # The node advertises 40 CPUs, but every job runs on this machine's 2 cores: one torch thread
    # per job keeps the jobs running side by side from spinning against each other.
    run = run_snakemake(workdir, "--profile", "slurm", *LOOPBACK_OVERRIDES, "--max-threads", "1",
                        *TINY_RANDOM_MODEL, "slurm-run.yaml",
                        env=env, timeout=RUN_TIMEOUT, log=workdir / "snakemake.log")
    seconds = time.monotonic() - started
    print(f"tiny pipeline through SLURM: {seconds:.0f} s in {workdir}")
    assert run.returncode == 0, run.stdout[-8000:]
    assert "Using profiles slurm and workflow specific profile profiles/default" in run.stdout
    return cluster, workdir, run.stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_every_job_of_the_pipeline_runs_through_sbatch(slurm_run):
    cluster, workdir, output = slurm_run
    assert (workdir / TINY_RESULTS / "report.md").exists()
    jobs = {job.jobid: job for job in planned_jobs(output)}
    submitted = dict(SUBMITTED.findall(output))          # Snakemake job id -> SLURM job id
    # `all` only collects the report, and the local rules take seconds: Snakemake runs them itself.
    assert set(submitted) == {jobid for jobid, job in jobs.items() if job.rule != "all" and not job.local}
    submitted_rules = {jobs[jobid].rule for jobid in submitted}
    for kind, rules in RULE_KINDS.items():
        assert rules <= submitted_rules, f"{kind} rules {rules - submitted_rules} did not go through sbatch"
    local_rules = {job.rule for job in jobs.values() if job.local}
    for kind, rules in LOCAL_KINDS.items():
        assert rules <= local_rules, f"{kind} rules {rules - local_rules} were not run by Snakemake itself"

    finished = cluster.finished_jobs()
    for jobid, slurm_id in submitted.items():
        record = finished.get(slurm_id)
        assert record is not None, f"SLURM has no record of job {slurm_id} ({jobs[jobid].rule})"
        assert record["JobState"] == "COMPLETED", record
        assert record["WorkDir"] == str(workdir)
        # The rules' memory requests (from the model's size for training and influence) reached
        # SLURM and were scheduled.
        assert tres_mem_mb(record["Tres"]) == float(jobs[jobid].resources["mem_mb"]), (jobs[jobid].rule, record)


@pytest.mark.slow
@pytest.mark.slurm
def test_jobs_that_ask_for_a_gpu_get_the_gpu_partition_and_model(slurm_run):
    cluster, _, output = slurm_run
    jobs = {job.jobid: job for job in planned_jobs(output)}
    finished = cluster.finished_jobs()
    misplaced = {}
    for jobid, slurm_id in SUBMITTED.findall(output):
        job = jobs[jobid]
        wants_gpu = int(job.resources.get("gpu", 0)) > 0
        expected = (cluster.gpu_partition, cluster.gpu_model) if wants_gpu else (cluster.cpu_partition, None)
        placed = (finished[slurm_id]["Partition"], job.resources.get("gpu_model"))
        if placed != expected:
            misplaced[f"{job.rule} {job.wildcards}"] = placed
    assert not misplaced, f"jobs in the wrong partition (or without the GPU model) for their GPU request: {misplaced}"
    training = [job for job in jobs.values() if job.rule in RULE_KINDS["training"]]
    assert training and all(job.resources.get("gpu") == "1" for job in training)


@pytest.mark.slow
@pytest.mark.slurm
def test_dpo_responses_pairs_answers_to_one_instruction(slurm_run):
    _, workdir, _ = slurm_run
    results = workdir / TINY_RESULTS
    assert "Teacher optimization: `dpo_responses`" in (results / "report.md").read_text()
    n = merged_config(TINY_RANDOM_MODEL, workdir / "slurm-run.yaml")["synthesis"]["n"]
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
