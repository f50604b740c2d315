"""tests/conftest.py's hook for the real-SLURM tests, as a user without root meets it: a one-line
skip, or, with CI=true, a failure naming why (root runs this as `nobody` through setpriv)."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline_helpers import ROOT

SLURM_TEST = "tests/test_slurm.py::test_mini_workflow_runs_through_sbatch"


def pytest_as_a_user(tmp_path, **env: str) -> subprocess.CompletedProcess:
    tmp_path.chmod(0o777)
    command = [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "--basetemp",
               str(tmp_path / "basetemp"), SLURM_TEST]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    base = {key: value for key, value in os.environ.items() if key != "CI"}
    return subprocess.run(command, check=False, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=base | {"HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"} | env, timeout=120)


def test_a_user_without_root_skips_the_slurm_tests_with_a_reason(tmp_path):
    run = pytest_as_a_user(tmp_path)
    assert run.returncode == 0, run.stdout
    assert "1 skipped" in run.stdout
    assert "SKIPPED [1] tests/test_slurm.py:" in run.stdout
    assert "real SLURM needs root" in run.stdout and "CI=true makes it required" in run.stdout


def test_ci_requires_the_slurm_tests(tmp_path):
    run = pytest_as_a_user(tmp_path, CI="true")
    assert run.returncode == 1, run.stdout
    assert "1 error" in run.stdout              # fails in setup, before SLURM is started
    assert "CI=true requires the real-SLURM tests, but SLURM needs root" in run.stdout
