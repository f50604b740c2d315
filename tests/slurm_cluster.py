"""A real one-node SLURM cluster on loopback for tests, and a way to run Snakemake against it.

Import the fixture into a test module (`from slurm_cluster import slurm_cluster`); every module
that does so in one pytest session shares the same cluster, which is shut down when the session
ends. Runs go through the project's own `profiles/slurm` unchanged, plus LOOPBACK_OVERRIDES (the
only command-line changes a cluster without an accounting daemon needs) and the site variables
`SlurmCluster.site_env()` sets, exactly as a user's site would.

The node advertises GPUs of a type (gres `gpu:h100:N`, backed by copies of /dev/null) and the
size of a GPU node, so GPU rules keep their `gpu`, `gpu_model` and `cpus_per_gpu` requests and
are scheduled for real: SLURM sets CUDA_VISIBLE_DEVICES and rejects what the node cannot give.
Nothing runs on a GPU; jobs run on this machine's CPUs.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "slurm"
SLURM_PROFILE = ROOT / "profiles" / "slurm"

# The command-line options a one-node loopback cluster needs on top of profiles/slurm.
LOOPBACK_OVERRIDES = (
    # There is no slurmdbd, so `sacct` fails and the plugin's default status query would
    # wait forever; squeue works because start-slurm.sh keeps finished jobs for MinJobAge.
    "--slurm-status-command", "squeue",
    # The plugin waits this long before its first status check and again after every check
    # that finds a job finished, adding 10 s after each check that finds none (up to 180 s):
    # the default 40 s would make each wave of jobs wait 40 s. It must stay <= MinJobAge / 3
    # (start-slurm.sh: 600 s) or the plugin falls back to sacct.
    "--slurm-init-seconds-before-status-checks", "1",
)

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


@dataclass(frozen=True)
class SlurmCluster:
    base: Path
    cpu_partition: str = "cpu"
    gpu_partition: str = "gpu"
    gpu_model: str = "h100"
    gpus: int = 4
    # A GPU node's size: 8 CPUs per GPU (the profile's default) plus room for CPU jobs.
    node_cpus: int = 40
    node_mem_mb: int = 1_000_000
    account: str = "ci"

    @property
    def jobcomp_log(self) -> Path:
        return self.base / "log" / "jobcomp.log"

    def script_env(self) -> dict[str, str]:
        return {
            "SLURM_BASE": str(self.base),
            "SLURM_PARTITION": self.cpu_partition,
            "SLURM_GPU_PARTITION": self.gpu_partition,
            "SLURM_FAKE_GPUS": str(self.gpus),
            "SLURM_GPU_TYPE": self.gpu_model,
            "SLURM_NODE_CPUS": str(self.node_cpus),
            "SLURM_NODE_MEM_MB": str(self.node_mem_mb),
        }

    def site_env(self) -> dict[str, str]:
        """The variables profiles/slurm/README.md tells a site to set."""
        return {
            "MONTESSORI_SLURM_ACCOUNT": self.account,
            "MONTESSORI_SLURM_CPU_PARTITION": self.cpu_partition,
            "MONTESSORI_SLURM_GPU_PARTITION": self.gpu_partition,
            "MONTESSORI_SLURM_GPU_MODEL": self.gpu_model,
        }

    def env(self, site: dict[str, str] | None = None) -> dict[str, str]:
        """The submitting environment with the site variables `site` (default: site_env())."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("MONTESSORI_SLURM_")}
        # Jobs inherit the submitting environment (sbatch --export=ALL): a GPU job must see
        # only what SLURM gave it.
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env | (self.site_env() if site is None else site)

    def snakemake(self, *args: str, cwd: Path = ROOT, timeout: int = 600, log: Path | None = None,
                  profile: str = str(SLURM_PROFILE), env: dict[str, str] | None = None,
                  ) -> subprocess.CompletedProcess:
        """`snakemake --profile PROFILE LOOPBACK_OVERRIDES *args` (profiles/slurm unless another
        profile is named), output captured (and written to `log`); killed after `timeout` s (a
        hung Snakemake ignores SIGTERM). `env` replaces the site variables of `env()`."""
        command = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "snakemake",
                   "--profile", profile, *LOOPBACK_OVERRIDES, *args]
        run_env = self.env() if env is None else env
        result = subprocess.run(command, check=False, cwd=cwd, env=run_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if log is not None:
            log.write_text(result.stdout)
        return result

    def finished_jobs(self) -> dict[str, dict[str, str]]:
        """SLURM's own record of every finished job (jobcomp/filetxt), by SLURM job id."""
        if not self.jobcomp_log.exists():
            return {}
        jobs = {}
        for line in self.jobcomp_log.read_text().splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            jobs[fields["JobId"]] = fields
        return jobs


def submitted_slurm_jobs(snakemake_output: str) -> list[str]:
    """SLURM job ids the plugin reported submitting, in order."""
    return [slurm_id for _, slurm_id in SUBMITTED.findall(snakemake_output)]


def start_cluster(base: Path, **settings) -> SlurmCluster:
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests bring up slurmctld/slurmd with tests/slurm/start-slurm.sh, "
                    "which needs root (apt-get, /etc/slurm, munge): run them as root")
    cluster = SlurmCluster(base=base, **settings)
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPTS / "start-slurm.sh")], check=False,
                            env=os.environ | cluster.script_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    if result.returncode != 0:
        stop_cluster(cluster)
        pytest.fail(f"tests/slurm/start-slurm.sh failed (exit {result.returncode}):\n{result.stdout}")
    logger.info("SLURM up in %.1f s (%s)", time.monotonic() - started, base)
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    result = subprocess.run(["bash", str(SCRIPTS / "stop-slurm.sh")], check=False,
                            env=os.environ | cluster.script_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"tests/slurm/stop-slurm.sh failed (exit {result.returncode}):\n{result.stdout}")


_session_cluster: SlurmCluster | None = None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """One cluster per pytest session, however many modules import this fixture."""
    global _session_cluster
    if _session_cluster is None:
        _session_cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield _session_cluster
    if _session_cluster is not None:
        cluster, _session_cluster = _session_cluster, None
        stop_cluster(cluster)
