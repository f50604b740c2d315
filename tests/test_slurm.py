"""profiles/slurm on a real SLURM: a one-node cluster on loopback (tests/slurm_cluster.py) runs a
small workflow whose rules carry the pipeline's rule names and declare their needs as the
pipeline's rules do (montessori/cluster.py), through the project's own profile."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from slurm_cluster import ROOT, SLURM_PROFILE, slurm_cluster, submitted_slurm_jobs  # noqa: F401 (fixture)

MINI = ROOT / "tests" / "slurm" / "mini" / "Snakefile"

SITE_ENV = {
    "MONTESSORI_SLURM_ACCOUNT": "ci",
    "MONTESSORI_SLURM_CPU_PARTITION": "cpu",
    "MONTESSORI_SLURM_GPU_PARTITION": "gpu",
}


def dry_run_with(site_env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MONTESSORI_SLURM_")}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(SLURM_PROFILE), "--snakefile", str(MINI),
         "--directory", str(tmp_path), "--dry-run"],
        check=False, cwd=ROOT, env=env | site_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
    )


# The profile requires these two; the GPU partition is the rules' to require (tests/test_cluster.py).
@pytest.mark.parametrize("variable", ["MONTESSORI_SLURM_ACCOUNT", "MONTESSORI_SLURM_CPU_PARTITION"])
@pytest.mark.parametrize("value", [None, "  "], ids=["unset", "blank"])
def test_profile_names_a_missing_site_variable(variable, value, tmp_path):
    site_env = {key: val for key, val in SITE_ENV.items() if key != variable}
    if value is not None:
        site_env[variable] = value
    result = dry_run_with(site_env, tmp_path)
    assert result.returncode != 0
    assert f"the montessori SLURM profile needs the environment variable {variable}" in result.stdout
    assert "profiles/slurm/README.md" in result.stdout
    assert not (tmp_path / ".snakemake").exists(), "Snakemake must stop before it starts the workflow"


def test_a_bad_cpus_per_gpu_is_named(tmp_path):
    result = dry_run_with(SITE_ENV | {"MONTESSORI_SLURM_CPUS_PER_GPU": "eight"}, tmp_path)
    assert result.returncode != 0
    assert "MONTESSORI_SLURM_CPUS_PER_GPU) must be a positive whole number" in result.stdout


def test_profile_gives_gpu_rules_the_gpu_partition_and_model(tmp_path):
    result = dry_run_with(SITE_ENV | {"MONTESSORI_SLURM_GPU_MODEL": "a100", "MONTESSORI_SLURM_CPUS_PER_GPU": "12"},
                          tmp_path)
    assert result.returncode == 0, result.stdout
    resources = dict(re.findall(r"\nrule (\w+):\n(?:    .*\n)*?    resources: (.*)", result.stdout))
    gpu = dict(item.split("=", 1) for item in resources["influence"].split(", "))
    cpu = dict(item.split("=", 1) for item in resources["merge_influence"].split(", "))
    assert {key: gpu[key] for key in ("slurm_account", "slurm_partition", "gpu", "gpu_model", "cpus_per_gpu", "nodes")} == {
        "slurm_account": "ci", "slurm_partition": "gpu", "gpu": "1", "gpu_model": "a100", "cpus_per_gpu": "12", "nodes": "1"}
    assert (cpu["slurm_account"], cpu["slurm_partition"]) == ("ci", "cpu")
    assert not {"gpu", "gpu_model", "cpus_per_gpu"} & cpu.keys()


def read_record(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.slurm
def test_mini_workflow_runs_through_sbatch(slurm_cluster, tmp_path):  # noqa: F811 (the imported fixture)
    cluster = slurm_cluster
    workdir = tmp_path / "work"
    run = cluster.snakemake("--snakefile", str(MINI), "--directory", str(workdir), timeout=300,
                            log=tmp_path / "snakemake.log")
    assert run.returncode == 0, run.stdout

    submitted = submitted_slurm_jobs(run.stdout)
    assert len(submitted) == 3, run.stdout          # two GPU shards and the merge
    finished = cluster.finished_jobs()
    for slurm_id in submitted:
        assert finished[slurm_id]["JobState"] == "COMPLETED", finished.get(slurm_id)
        assert finished[slurm_id]["WorkDir"] == str(workdir)

    shards = [read_record(workdir / f"shard-{shard}.txt") for shard in (0, 1)]
    for shard in shards:
        assert shard["slurm_job_id"] in submitted
        assert shard["partition"] == cluster.gpu_partition
        assert finished[shard["slurm_job_id"]]["Partition"] == cluster.gpu_partition
        assert shard["cuda_visible_devices"] != ""
        job = shard["job"]
        assert f"Account={cluster.account} " in job
        assert f"TresPerJob=gres:gpu:{cluster.gpu_model}:1" in job, job
        assert "NumNodes=1 " in job
        assert re.search(r"NumCPUs=8\b", job), job          # cpus_per_gpu 8 x 1 GPU
        assert "MinMemoryNode=4000M" in job, job             # the profile's default mem_mb
    assert shards[0]["slurm_job_id"] != shards[1]["slurm_job_id"]

    merged = read_record(workdir / "merged.txt")
    assert merged["slurm_job_id"] in submitted
    assert merged["partition"] == cluster.cpu_partition
    assert finished[merged["slurm_job_id"]]["Partition"] == cluster.cpu_partition
    assert merged["cuda_visible_devices"] == ""
    assert "gres:gpu" not in merged["job"]
    assert f"Account={cluster.account} " in merged["job"]

    again = cluster.snakemake("--snakefile", str(MINI), "--directory", str(workdir), timeout=120,
                              log=tmp_path / "snakemake-again.log")
    assert again.returncode == 0, again.stdout
    assert "Nothing to be done" in again.stdout
    assert submitted_slurm_jobs(again.stdout) == []
