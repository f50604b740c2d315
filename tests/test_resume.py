"""Resume after a hard kill: Snakemake and its jobs are SIGKILLed in the middle of a generation shard,
rerun (after `--unlock`, as docs/cluster.md says), killed again in the middle of an influence shard,
and rerun to the end. Finished jobs must not run again, an interrupted shard must continue from its
last written record, and the outputs must equal those of the uninterrupted session run.

One scenario, one pipeline run up to the influence merge (the stages a kill can interrupt
mid-shard), shared by the tests below, and one uninterrupted run to the same target. Both on the
embedded model (tests/configs/tiny.yaml): its shards take seconds per record, so a kill lands
mid-shard, where the random model of the other pipeline runs would finish a shard between two polls.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_helpers import (
    LOCAL_CORES,
    TINY,
    TINY_RESULTS,
    complete_lines,
    kill_hard,
    make_workdir,
    output_mtimes,
    planned_jobs,
    read_jsonl,
    run_snakemake,
    start_snakemake,
    wait_until,
    without_timing,
)

TARGET = f"{TINY_RESULTS}/round1/influence/influence.jsonl"
# One job at a time, so that a kill interrupts exactly the shard it waits for and no job that has
# just written its output; one torch thread, as in the session run, so that the numbers compare
# bit for bit. Targets go before --configfile, which takes every value that follows it.
COMMAND = ("--cores", "1", TARGET, *TINY)
PROBES = f"{TINY_RESULTS}/round1/probes"
INFLUENCE = f"{TINY_RESULTS}/round1/influence"
STAGE_TIMEOUT = 1200
TEMP_OUTPUTS = {f"{TINY_RESULTS}/round1/warmup.done"}


@dataclass
class Interruption:
    """A shard killed while running: what was finished at that moment, and the shard's own records."""
    shard: int
    shard_path: str                 # the shard's declared output (workdir-relative)
    records_at_kill: list[str]      # its complete lines in `<out>.partial` when the run was killed
    finished_at_kill: dict[str, int]
    rerun_output: str = ""          # Snakemake's output of the run that resumed it


@dataclass
class Scenario:
    workdir: Path
    generation: Interruption
    influence: Interruption
    locked_output: str


def kill_mid_shard(workdir: Path, shard_pattern: str, log: Path) -> Interruption:
    """Run COMMAND until one shard of `shard_pattern` ({shard} in it) is finished and the other has
    written at least one record to its `.partial` file, then SIGKILL the whole run."""
    shards = [workdir / shard_pattern.format(shard=shard) for shard in (0, 1)]

    def interrupted_shard() -> int | None:
        for shard, path in enumerate(shards):
            partial = path.with_name(path.name + ".partial")
            if shards[1 - shard].exists() and complete_lines(partial) >= 1:
                return shard
        return None

    process = start_snakemake(workdir, *COMMAND, log=log)
    wait_until(lambda: interrupted_shard() is not None, process, STAGE_TIMEOUT,
               f"one shard {shard_pattern} finished and the other's .partial (montessori.io.resumable_shard) "
               f"held a record", log)
    kill_hard(process)
    shard = interrupted_shard()
    partial = shards[shard].with_name(shards[shard].name + ".partial")
    assert not shards[shard].exists(), "the killed shard must not look finished"
    complete = partial.read_text().split("\n")[:-1]
    return Interruption(shard, str(shards[shard].relative_to(workdir)), complete, output_mtimes(workdir))


def refused_for_the_lock(workdir: Path, log: Path) -> str:
    """The same command right after the kill: Snakemake must refuse the directory the killed run locked."""
    process = start_snakemake(workdir, *COMMAND, log=log)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        kill_hard(process)
        pytest.fail(f"after the kill, Snakemake started a run instead of refusing the locked directory:\n"
                    f"{log.read_text()[-3000:]}")
    assert process.returncode != 0, log.read_text()
    return log.read_text()


def unlock(workdir: Path) -> None:
    result = run_snakemake(workdir, "--unlock", *TINY)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def uninterrupted(module_tmp) -> Path:
    """The same target without a kill: the reference the resumed outputs must equal, bit for bit
    (two jobs at a time here, one torch thread each as in the scenario)."""
    workdir = make_workdir(module_tmp / "uninterrupted")
    run = run_snakemake(workdir, *LOCAL_CORES, TARGET, *TINY, timeout=STAGE_TIMEOUT, log=workdir / "snakemake.log")
    assert run.returncode == 0, run.stdout[-6000:]
    return workdir


@pytest.fixture(scope="module")
def scenario(module_tmp) -> Scenario:
    workdir = make_workdir(module_tmp / "work")
    started = time.monotonic()
    generation = kill_mid_shard(workdir, f"{PROBES}/instructions.shard-{{shard}}.jsonl", workdir / "run-1.log")

    locked = refused_for_the_lock(workdir, workdir / "run-locked.log")
    unlock(workdir)
    influence = kill_mid_shard(workdir, f"{INFLUENCE}/shard-{{shard}}.jsonl", workdir / "run-2.log")
    generation.rerun_output = (workdir / "run-2.log").read_text()

    unlock(workdir)
    final = run_snakemake(workdir, *COMMAND, timeout=STAGE_TIMEOUT, log=workdir / "run-3.log")
    assert final.returncode == 0, final.stdout[-6000:]
    influence.rerun_output = final.stdout
    print(f"resume scenario: {time.monotonic() - started:.0f} s in {workdir}")
    return Scenario(workdir, generation, influence, locked)


def shard_log(workdir: Path, interruption: Interruption, rule_log: str) -> str:
    return (workdir / f"logs/tiny/round1/{rule_log}.shard-{interruption.shard}.log").read_text()


def assert_finished_jobs_not_rerun(workdir: Path, interruption: Interruption) -> None:
    assert interruption.finished_at_kill, "something had finished before the kill"
    now = output_mtimes(workdir)
    # storage.keep.warmup false: the warm-up sentinel is a temp() output, gone once influence read it.
    removed = {name for name in interruption.finished_at_kill if name not in now}
    assert removed <= TEMP_OUTPUTS, f"outputs finished before the kill are gone: {removed - TEMP_OUTPUTS}"
    changed = [name for name, mtime in interruption.finished_at_kill.items() if name in now and now[name] != mtime]
    assert not changed, f"outputs finished before the kill were written again: {changed}"


def assert_resumed_from_its_records(workdir: Path, interruption: Interruption) -> None:
    """The records written before the kill open the finished shard file unchanged, timings included."""
    final = (workdir / interruption.shard_path).read_text().split("\n")[:-1]
    assert len(final) > len(interruption.records_at_kill), "the kill came before the shard's last record"
    assert final[:len(interruption.records_at_kill)] == interruption.records_at_kill


@pytest.mark.slow
def test_a_locked_directory_after_a_kill_is_reported(scenario):
    assert "cannot be locked" in scenario.locked_output, scenario.locked_output[-3000:]


@pytest.mark.slow
def test_a_killed_generation_shard_resumes_and_matches_an_uninterrupted_run(scenario, uninterrupted: Path):
    workdir, killed = scenario.workdir, scenario.generation
    assert_finished_jobs_not_rerun(workdir, killed)
    finished_shard = f"instructions.shard-{1 - killed.shard}.jsonl"
    resumed_jobs = {(job.rule, job.wildcards.get("set"), job.wildcards.get("shard"))
                    for job in planned_jobs(killed.rerun_output)}
    assert ("synth_instructions", "probes", str(1 - killed.shard)) not in resumed_jobs
    assert ("synth_instructions", "probes", str(killed.shard)) in resumed_jobs
    resumed_rules = {rule for rule, _, _ in resumed_jobs}
    resumed_cards = {job.wildcards.get("role") for job in planned_jobs(killed.rerun_output) if job.rule == "prepare_model"}
    assert "seed_pool" not in resumed_rules and "teacher" not in resumed_cards, "synthesis had its inputs before the kill"
    # With one core, Snakemake may schedule the reference set and the student's card (inputs of the
    # warm-up, not of synthesis) before or after the synthesis shards.
    if f"{TINY_RESULTS}/reference.jsonl" in killed.finished_at_kill:
        assert "reference_set" not in resumed_rules
    if f"{TINY_RESULTS}/models/student.json" in killed.finished_at_kill:
        assert "student" not in resumed_cards

    log = shard_log(workdir, killed, "probes/synth_instructions")
    assert f"resuming from {len(killed.records_at_kill)} records" in log, log
    assert_resumed_from_its_records(workdir, killed)

    for name in (finished_shard, f"instructions.shard-{killed.shard}.jsonl", "instructions.jsonl",
                 "responses.jsonl", "warmup.jsonl", "probing.jsonl"):
        resumed = read_jsonl(workdir / PROBES / name)
        assert resumed == read_jsonl(uninterrupted / PROBES / name), f"{PROBES}/{name} differs from the uninterrupted run"


@pytest.mark.slow
def test_a_killed_influence_shard_resumes_and_matches_an_uninterrupted_run(scenario, uninterrupted: Path):
    workdir, killed = scenario.workdir, scenario.influence
    assert_finished_jobs_not_rerun(workdir, killed)
    assert f"{INFLUENCE}/shard-{1 - killed.shard}.jsonl" in killed.finished_at_kill
    assert f"{TINY_RESULTS}/round1/warmup.done" in killed.finished_at_kill
    rerun_rules = {job.rule for job in planned_jobs(killed.rerun_output)}
    assert rerun_rules == {"influence", "merge_influence"}, rerun_rules

    log = shard_log(workdir, killed, "influence")
    assert f"{len(killed.records_at_kill)} already scored" in log, log
    assert_resumed_from_its_records(workdir, killed)

    for name in ("shard-0.jsonl", "shard-1.jsonl", "influence.jsonl"):
        resumed = without_timing(read_jsonl(workdir / INFLUENCE / name))
        reference = without_timing(read_jsonl(uninterrupted / INFLUENCE / name))
        assert [r["id"] for r in resumed] == [r["id"] for r in reference], name
        assert resumed == reference, f"{INFLUENCE}/{name}: scores differ from the uninterrupted run"


@pytest.mark.slow
def test_after_the_resume_there_is_nothing_to_do(scenario):
    again = run_snakemake(scenario.workdir, *COMMAND)
    assert again.returncode == 0, again.stdout
    assert "Nothing to be done" in again.stdout
