"""Run the Snakemake pipeline as a user does, in a throwaway copy of the workflow, and read what it did.

Each run gets its own working directory holding symlinks to the workflow (Snakefile, rules, schemas,
config.yaml, data, envs, profiles, report, tests/configs) and to `resources/models`, so that runs do not
share `results/` or Snakemake's lock, the config's relative paths (`data/seeds.jsonl`) resolve as in
a clone, and the embedded model is converted once per machine, not once per run.

Rules call `python -m montessori`: every Snakemake started here gets this interpreter's `bin/`
first on PATH, so jobs run in the environment the tests run in.

The fixtures `finished_tiny_run` (the pipeline run end to end once per pytest session on
SHARED_RUN_CONFIG) and `tiny_run_copy` (a hard-linked copy of it, for a test that writes) live in
conftest.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_ITEMS = ("Snakefile", "rules", "schemas", "config.yaml", "data", "envs", "profiles", "report")
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"
# Later config files win: the tiny config is merged over the shipped one.
TINY = ("--configfile", "config.yaml", "tests/configs/tiny.yaml")
# The tiny config on the random model: for runs whose tests read the workflow, not the model.
TINY_RANDOM_MODEL = (*TINY, "tests/configs/random-model.yaml")
# The session's shared finished run (`finished_tiny_run`): every test that reads it, reruns it or
# extends it passes these config files. The random model: its tests read which jobs ran and what
# they wrote, not what a model said (the embedded model runs the kill-and-resume stages).
SHARED_RUN_CONFIG = TINY_RANDOM_MODEL
TINY_RUN_NAME = yaml.safe_load(TINY_CONFIG.read_text())["run"]
TINY_RESULTS = f"results/{TINY_RUN_NAME}"
# Keys of shard records that measure time, not content: they differ between identical runs.
TIMING_KEYS = frozenset({"seconds"})
END_TO_END_TIMEOUT = 1800
# Two jobs at a time, one torch thread each. A job's `threads: 2` becomes OMP_NUM_THREADS=2, and
# on a 2-core machine that other work shares, two spinning OpenMP threads per job make generation
# about 100x slower (measured: 0.13 s for one generate() call with one thread, 17-31 s with two).
LOCAL_CORES = ("--cores", "2", "--max-threads", "1")


def make_workdir(path: Path) -> Path:
    """A working directory that looks like a clone of the project to Snakemake."""
    path.mkdir(parents=True, exist_ok=True)
    for item in WORKFLOW_ITEMS:
        (path / item).symlink_to(ROOT / item)
    (path / "tests").mkdir(exist_ok=True)
    (path / "tests" / "configs").symlink_to(ROOT / "tests" / "configs")
    (path / "resources").mkdir(exist_ok=True)
    (ROOT / "resources" / "models").mkdir(parents=True, exist_ok=True)
    (path / "resources" / "models").symlink_to(ROOT / "resources" / "models")
    return path


def pipeline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env | extra


def snakemake_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def run_snakemake(workdir: Path, *args: str, timeout: int = 300, log: Path | None = None,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`snakemake *args` in `workdir`, stdout and stderr together (and written to `log`); on timeout
    Snakemake and the jobs it started are killed, none is left running."""
    command = snakemake_command(*args)
    with subprocess.Popen(command, cwd=workdir, env=env or pipeline_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_hard(process)
            pytest.fail(f"`snakemake {' '.join(args)}` in {workdir} took more than {timeout} s")
    if log is not None:
        log.write_text(output)
    return subprocess.CompletedProcess(command, process.returncode, output)


def start_snakemake(workdir: Path, *args: str, log: Path) -> subprocess.Popen:
    """Snakemake in the background, in a process group of its own (its jobs are its children)."""
    with log.open("w") as handle:
        return subprocess.Popen(snakemake_command(*args), cwd=workdir, env=pipeline_env(), text=True,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def kill_hard(process: subprocess.Popen) -> None:
    """SIGKILL Snakemake and every job it started, as a lost login session or `kill -9` would."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def wait_until(condition, process: subprocess.Popen, timeout: float, what: str, log: Path,
               poll: float = 0.1) -> None:
    """Poll `condition()` until it holds; fail (killing the run) if the run ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the pipeline ended (exit {process.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            kill_hard(process)
            pytest.fail(f"{what} did not happen within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(poll)


def complete_lines(path: Path) -> int:
    """Records in a shard file: newline-terminated lines (the last may be mid-write)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@dataclass
class PlannedJob:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    jobid: str = ""
    resources: dict[str, str] = field(default_factory=dict)
    local: bool = False             # a `localrules` job: Snakemake runs it itself, never submitted

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.rule, tuple(sorted(self.wildcards.items()))


RULE_BLOCK = re.compile(r"^(local)?rule (\w+):\n((?:    .*\n?)*)", re.MULTILINE)


def planned_jobs(snakemake_output: str) -> list[PlannedJob]:
    """The jobs a (dry) run printed, each with its wildcards and Snakemake's reason for running it."""
    jobs = []
    for local, rule, body in RULE_BLOCK.findall(snakemake_output):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.MULTILINE))
        wildcards = dict(item.split("=", 1) for item in fields["wildcards"].split(", ")) if "wildcards" in fields else {}
        resources = dict(item.split("=", 1) for item in fields["resources"].split(", ")) if "resources" in fields else {}
        jobs.append(PlannedJob(rule, wildcards, fields.get("reason", ""), fields.get("jobid", ""), resources,
                               local=bool(local)))
    return jobs


def job_stats(snakemake_output: str) -> Counter:
    """Snakemake's own `Job stats` table: jobs per rule (the last table printed)."""
    tables = re.findall(r"Job stats:\njob\s+count\n[- ]+\n((?:\S+\s+\d+\n)+)", snakemake_output)
    if not tables:
        raise AssertionError(f"no 'Job stats' table in the Snakemake output:\n{snakemake_output[-3000:]}")
    counts = Counter({rule: int(count) for rule, count in re.findall(r"^(\S+)\s+(\d+)$", tables[-1], re.MULTILINE)})
    del counts["total"]
    return counts


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSONL file must parse (a failure names the file and line)."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise AssertionError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return records


def without_timing(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


def output_mtimes(workdir: Path, under: str = TINY_RESULTS) -> dict[str, int]:
    """mtime (ns) of every finished file under results/<run>; shards still being written are skipped."""
    base = workdir / under
    return {str(path.relative_to(workdir)): path.stat().st_mtime_ns
            for path in base.rglob("*") if path.is_file() and not path.name.endswith((".partial", ".tmp"))}


def run_stage(stage: str, settings: dict, *args: str, cwd: Path, timeout: int = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m montessori STAGE --settings JSON *args`, as a rule calls it."""
    command = [sys.executable, "-m", "montessori", stage, "--settings", json.dumps(settings), *args]
    return subprocess.run(command, cwd=cwd, env=env or pipeline_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout, check=False)


@dataclass(frozen=True)
class FinishedRun:
    workdir: Path

    @property
    def results(self) -> Path:
        return self.workdir / TINY_RESULTS


def merged_config(config_files: tuple[str, ...], *extra: Path) -> dict:
    """The config a run given `config_files` (`--configfile` and paths under ROOT: TINY,
    SHARED_RUN_CONFIG, ...) and then the files `extra` works with."""
    from montessori.config import load_config

    return load_config(*(ROOT / path for path in config_files[1:]), *extra)


def run_tiny_pipeline(workdir: Path) -> FinishedRun:
    """The shared run's config end to end with the workflow profile (as `snakemake` runs it) in `workdir`."""
    started = time.monotonic()
    run = run_snakemake(workdir, *LOCAL_CORES, *SHARED_RUN_CONFIG, timeout=END_TO_END_TIMEOUT,
                        log=workdir / "snakemake.log")
    logger.warning("tiny pipeline end to end: %.0f s (%s)", time.monotonic() - started, workdir)
    assert run.returncode == 0, run.stdout[-6000:]
    return FinishedRun(workdir)


def copy_of_run(finished: FinishedRun, destination: Path) -> Path:
    """The finished run's working directory with its files hard-linked (every stage replaces its
    outputs by rename, so the copy never writes into the shared run) and its symlinks kept."""
    shutil.copytree(finished.workdir, destination, symlinks=True, copy_function=os.link)
    return destination
