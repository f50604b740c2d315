"""A site's own SLURM profile on a real SLURM (tests/slurm_cluster.py): a profile of another name
that sets only the executor, the account and `jobs` (Snakemake requires it of any cluster run),
plus our workflow profile and rules, must put GPU jobs in the GPU partition with their
gpu/gpu_model requests, read back from SLURM's own records.
(`snakemake --profile slurm` with ours installed runs in tests/test_slurm_pipeline.py.)"""

from __future__ import annotations

import re

import pytest
import yaml
from slurm_cluster import ROOT, slurm_cluster, submitted_slurm_jobs  # noqa: F401 (fixture)

MINI = ROOT / "tests" / "slurm" / "mini" / "Snakefile"


def read_record(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.slurm
def test_a_minimal_site_profile_gets_gpu_jobs_right(slurm_cluster, tmp_path):  # noqa: F811 (fixture)
    cluster = slurm_cluster
    xdg = tmp_path / "xdg"
    (xdg / "snakemake" / "mysite").mkdir(parents=True)
    # Snakemake itself wants `jobs` with any cluster executor; nothing else about the workflow.
    (xdg / "snakemake" / "mysite" / "config.yaml").write_text(yaml.safe_dump(
        {"executor": "slurm", "jobs": 10, "default-resources": {"slurm_account": cluster.account}}))
    # The user names only the GPU partition; the CPU job goes to the cluster's default partition.
    env = cluster.env(site={"MONTESSORI_SLURM_GPU_PARTITION": cluster.gpu_partition}) | {"XDG_CONFIG_HOME": str(xdg)}
    workdir = tmp_path / "work"
    run = cluster.snakemake("--snakefile", str(MINI), "--directory", str(workdir), profile="mysite", env=env,
                            timeout=300, log=tmp_path / "snakemake.log")
    assert run.returncode == 0, run.stdout
    assert "Using profiles mysite and workflow specific profile" in run.stdout

    submitted = submitted_slurm_jobs(run.stdout)
    assert len(submitted) == 3, run.stdout
    finished = cluster.finished_jobs()
    for slurm_id in submitted:
        assert finished[slurm_id]["JobState"] == "COMPLETED", finished.get(slurm_id)
    for shard in (read_record(workdir / f"shard-{n}.txt") for n in (0, 1)):
        job = shard["job"]
        assert finished[shard["slurm_job_id"]]["Partition"] == cluster.gpu_partition
        assert f"TresPerJob=gres:gpu:{cluster.gpu_model}:1" in job, job     # gpu=1 with the default model
        assert re.search(r"NumCPUs=8\b", job) and "NumNodes=1 " in job, job
        assert f"Account={cluster.account} " in job
        assert shard["cuda_visible_devices"] != ""
    merged = read_record(workdir / "merged.txt")
    assert finished[merged["slurm_job_id"]]["Partition"] == cluster.cpu_partition   # Default=YES there
    assert "gres:gpu" not in merged["job"] and f"Account={cluster.account} " in merged["job"]
