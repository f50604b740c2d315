"""The pipeline as a user runs it: the DAG of a dry run, the tiny config end to end, a second run
with nothing to do, and a student swap that replans only what depends on the student."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import (
    LOCAL_CORES,
    ROOT,
    SHARED_RUN_CONFIG,
    TINY,
    TINY_CONFIG,
    TINY_RESULTS,
    job_stats,
    make_workdir,
    merged_config,
    output_mtimes,
    planned_jobs,
    read_jsonl,
    run_snakemake,
)

from montessori.config import load_config
from montessori.memory import rule_memory_mb

STUDENTS = ["base", "montessori-round1", "self_instruct-round1"]
# one job per student and model: the student generating, the student scored, the judge judging
EVAL_RULES = ("eval_generate", "eval_score", "eval_judge")


def expected_job_counts(config: dict) -> dict[str, int]:
    rounds, methods = config["rounds"], config["methods"]
    # llm2llm: no instructions of the teacher's own; its sets are answered seeds and augmentations
    llm2llm = "llm2llm" in methods
    sets = rounds * (1 + len(methods) - llm2llm)  # the probes and one training set per method, each round
    # self_reward: the teacher writes only instructions; the student answers and learns by DPO
    self_reward = "self_reward" in methods
    sft_methods = [method for method in methods if method != "self_reward"]
    answered_sets = sets - rounds * self_reward
    synth_shards = config["synthesis"]["shards"]
    transfer = len(config["transfer_students"])
    # the main student untrained and of each round, and each transfer student trained on each SFT method's set
    students = 1 + rounds * len(methods) + transfer * len(sft_methods)
    counts = {
        "prepare_model": 2 + (config["evaluation"]["judge"]["type"] == "local"),
        "seed_pool": 1, "reference_set": 1,
        "synth_instructions": sets * synth_shards, "merge_instructions": sets,
        "synth_responses": answered_sets * synth_shards, "merge_responses": answered_sets,
        "split_probes": rounds, "warmup": rounds, "influence": rounds * config["influence"]["shards"],
        "merge_influence": rounds, "preference_pairs": rounds, "dpo_teacher": rounds,
        "sft_student": rounds * len(sft_methods), "analysis_figures": 1, "report": 1, "all": 1,
    }
    if llm2llm:                                   # D_0 answered (round 0), then per round: the hardest seeds
        counts["synth_responses"] += (1 + rounds) * synth_shards   # augmented, answered, added, retrained
        counts["merge_responses"] += 1 + rounds
        counts["sft_student"] += 1                # round 0's student only finds the first hard seeds
        counts |= {"llm2llm_seeds": 1, "llm2llm_training_set": 1 + rounds, "llm2llm_hard_examples": rounds,
                   "llm2llm_augment": rounds}
    if self_reward:
        counts |= {rule: rounds for rule in ("self_reward_candidates", "self_reward_judge", "self_reward_pairs",
                                             "dpo_self_reward_student")}
    if not config["storage"]["keep"]["warmup"]:
        counts["remove_warmup"] = rounds
    if config["pairs"]["signal"] == "judge":      # the probes are rated instead of scored by influence
        for rule in ("warmup", "influence", "merge_influence", "remove_warmup"):
            counts.pop(rule, None)
        counts["judge_probes"] = rounds
    if transfer:
        counts |= {"prepare_transfer_model": transfer, "sft_transfer_student": transfer * len(sft_methods)}
    return counts | {rule: students for rule in EVAL_RULES}


def test_dry_run_draws_the_whole_dag(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    config = load_config(ROOT / "config.yaml")
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run")
    assert dry.returncode == 0, dry.stdout

    assert job_stats(dry.stdout) == expected_job_counts(config)
    jobs = planned_jobs(dry.stdout)
    assert sum(job_stats(dry.stdout).values()) == len(jobs)
    sets = ["probes"] + [f"{method}/train" for method in config["methods"]]
    synth_shards = [str(shard) for shard in range(config["synthesis"]["shards"])]
    for rule in ("synth_instructions", "synth_responses"):
        shards = sorted((job.wildcards["set"], job.wildcards["shard"]) for job in jobs if job.rule == rule)
        assert shards == sorted(itertools.product(sets, synth_shards)), rule
    for rule in ("merge_instructions", "merge_responses"):
        assert sorted(job.wildcards["set"] for job in jobs if job.rule == rule) == sorted(sets)
    influence_shards = sorted(job.wildcards["shard"] for job in jobs if job.rule == "influence")
    assert influence_shards == [str(shard) for shard in range(config["influence"]["shards"])]
    assert sorted(job.wildcards["method"] for job in jobs if job.rule == "sft_student") == sorted(config["methods"])
    for rule in EVAL_RULES:
        assert sorted(job.wildcards["student"] for job in jobs if job.rule == rule) == STUDENTS, rule
    assert not (workdir / "results").exists(), "a dry run writes nothing"


SMALL_JOBS = {"seed_pool", "reference_set", "merge_instructions", "merge_responses", "split_probes",
              "merge_influence", "preference_pairs", "remove_warmup", "analysis_figures", "report",
              "self_reward_pairs", "llm2llm_seeds", "llm2llm_training_set"}


def test_small_jobs_are_local_rules(tmp_path):
    """On a cluster, jobs of seconds run in Snakemake's own process instead of waiting in the queue.
    (A dry run prints every job as `rule`, so the workflow is loaded through Snakemake's API.)"""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    workdir = make_workdir(tmp_path / "work")
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=workdir / "Snakefile",
                                workdir=workdir)._workflow
        # is_local() holds for every rule when jobs run locally; the declared set is what a cluster uses.
        declared = set(workflow._localrules)
    assert declared == SMALL_JOBS


@pytest.mark.parametrize("presets", [["llama3-8b"], ["tinyllama"], ["tinyllama", "transfer"],
                                     ["llama3-8b", "seed-ablation-oasst"], ["llama3-8b", "table1"],
                                     ["tinyllama", "table1"]], ids="+".join)
def test_each_preset_plans_the_whole_dag_with_its_gpus(tmp_path, presets):
    """The paper presets, as a cluster user starts them (models and seeds by hub name; a dry run
    loads nothing): their chat templates are literal settings, not wildcards. The ablation and
    transfer presets are merged over a main preset."""
    workdir = make_workdir(tmp_path / "work")
    (workdir / "presets").symlink_to(ROOT / "presets")
    config = load_config(ROOT / "config.yaml", *(ROOT / "presets" / f"{preset}.yaml" for preset in presets))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run",
                        "--configfile", *(f"presets/{preset}.yaml" for preset in presets))
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert job_stats(dry.stdout) == expected_job_counts(config)
    jobs = planned_jobs(dry.stdout)
    compute = config["compute"]
    influence_gpus = {job.resources.get("gpu") for job in jobs if job.rule == "influence"}
    assert influence_gpus == {str(compute["gpus"] * config["influence"]["gpus_per_shard"])}
    training_gpus = {job.resources.get("gpu") for job in jobs if job.rule in ("warmup", "sft_student",
                                                                               "sft_transfer_student")}
    assert training_gpus == {str(compute["training_gpus"])}
    # each transfer student's SFT asks for the memory of its own model, computed as the main student's
    transfer_memory = {job.wildcards["name"]: int(job.resources["mem_mb"]) for job in jobs
                       if job.rule == "sft_transfer_student"}
    assert transfer_memory == {student["name"]: rule_memory_mb("sft", config, student["model"], "key")
                               for student in config["transfer_students"]}
    dpo_gpus = {job.resources.get("gpu") for job in jobs if job.rule == "dpo_teacher"}
    assert dpo_gpus == {str(config["dpo"]["gpus"] or compute["training_gpus"])}


def test_a_paper_reference_set_is_left_out_of_the_seed_pool_and_alpaca_eval(tmp_path):
    """With the original's reference set (AlpacaEval rows), the plan has the same jobs, and both the
    seed pool and every AlpacaEval generation job read the reference set to leave it out."""
    workdir = make_workdir(tmp_path / "work")
    paper = {"influence": {"reference": {"kind": "paper", "allow_eval_contamination": True,
                                         "source": str(ROOT.parent / "shared" / "data" / "alpaca_eval" /
                                                       "gpt4_1106_preview_outputs.json")}}}
    (workdir / "paper.yaml").write_text(yaml.safe_dump(paper))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", "--printshellcmds",
                        "--configfile", "config.yaml", "paper.yaml")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert job_stats(dry.stdout) == expected_job_counts(load_config(ROOT / "config.yaml"))
    reference = f"results/{load_config(ROOT / 'config.yaml')['run']}/reference.jsonl"
    commands = [line for line in dry.stdout.splitlines() if "python -m montessori" in line]
    generate = [line for line in commands if " eval_generate " in line]
    assert len(generate) == len(STUDENTS) and all(f"--exclude {reference}" in line for line in generate)
    assert any(" seed_pool " in line and f"--reference {reference}" in line for line in commands)


def test_training_jobs_get_the_logging_setting_at_runtime(tmp_path):
    """logging.report_to reaches every training command through --runtime, never its --settings
    (the params Snakemake compares)."""
    workdir = make_workdir(tmp_path / "work")
    (workdir / "logging.yaml").write_text(yaml.safe_dump({"logging": {"report_to": "tensorboard"}}))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", "--printshellcmds",
                        "--configfile", "config.yaml", "logging.yaml")
    assert dry.returncode == 0, dry.stdout[-3000:]
    commands = [line for line in dry.stdout.splitlines() if "python -m montessori" in line]
    training = [line for line in commands if re.search(r" -m montessori (warmup|sft_student|dpo_teacher) ", line)]
    assert len(training) == 2 + len(load_config(ROOT / "config.yaml")["methods"])
    for line in training:
        words = shlex.split(line)
        assert "report_to" not in words[words.index("--settings") + 1]
        assert json.loads(words[words.index("--runtime") + 1]) == {"logging": {"report_to": "tensorboard"}}
    assert not [line for line in commands if "report_to" in line and line not in training]


@pytest.mark.slow
def test_report_has_a_row_per_student_and_every_benchmark(finished_tiny_run):
    results = finished_tiny_run.results
    with open(results / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["student"] for row in rows] == STUDENTS
    columns = list(rows[0])
    for benchmark in ("alpaca_eval", "mt_bench", "lm_eval", "nll"):
        benchmark_columns = [c for c in columns if c.startswith(f"{benchmark}.")]
        assert benchmark_columns, f"report.csv has no {benchmark} column: {columns}"
        for row in rows:
            assert any(row[c] != "" for c in benchmark_columns), f"{row['student']} has no {benchmark} value: {row}"

    report = (results / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| student |"))
    for benchmark in ("alpaca_eval.", "mt_bench.", "lm_eval.", "nll."):
        assert benchmark in header
    assert "| nll.nll | montessori-round1 | base |" in report, "the report compares the students item by item"
    for student in STUDENTS:
        assert f"\n| {student} |" in report
    assert list((results / "figures").glob("*.png")), "the report draws figures"


ANALYSIS_FIGURES = ("influence.png", "helpful_share.png", "lengths.png", "dpo_rewards.png")


@pytest.mark.slow
def test_the_analysis_figures_are_drawn_from_the_run(finished_tiny_run):
    analysis = finished_tiny_run.results / "analysis"
    for name in ANALYSIS_FIGURES:
        assert (analysis / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    numbers = json.loads((analysis / "numbers.json").read_text())
    probing = read_jsonl(finished_tiny_run.results / "round1/probes/probing.jsonl")
    assert {row["n"] for row in numbers["helpful_share"]} == {len(probing)}
    assert {row["set"] for row in numbers["lengths_words"]} == {"probes", "montessori", "self_instruct"}
    assert set(numbers["dpo_rewards_last_step"]) == {"1"}
    report = (finished_tiny_run.results / "report.md").read_text()
    for name in ANALYSIS_FIGURES:
        assert f"](analysis/{name})" in report


@pytest.mark.slow
def test_the_html_report_is_self_contained_with_every_figure(tiny_run_copy):
    """`snakemake --report report.html` on a finished run: one file, nothing fetched from elsewhere,
    every figure and the results table in it with its caption, and the workflow description."""
    workdir = tiny_run_copy.workdir
    run = run_snakemake(workdir, *SHARED_RUN_CONFIG, "--report", "report.html", timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    html = (workdir / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""<(script|link|img)\b[^>]*\b(src|href)=["']?(https?:)?//""", html), \
        "the report loads something from the network"
    # every figure and the table embedded as a data URI (Snakemake's: data:<mime>;charset=..;filename=..;base64,)
    for name in (*ANALYSIS_FIGURES, "report.csv", "metrics.png", "teacher_loss.png", "student_loss.png",
                 "histogram.png"):
        assert re.search(rf"data:[^,\"]*;filename={re.escape(name)};base64,", html), name
    # captions (report/*.rst) and the workflow description (report/workflow.rst)
    for phrase in ("per round and score, with a Wilson 95%", "the reward accuracy, the share of pairs with a positive",
                   "lengths in words (whitespace-separated)", "The results table: one row per student",
                   "Montessori-Instruct: run"):
        assert phrase in html, phrase


@pytest.mark.slow
def test_every_jsonl_output_parses(finished_tiny_run):
    results = finished_tiny_run.results
    paths = sorted(results.rglob("*.jsonl"))
    assert not list(results.rglob("*.partial")), "every shard finished and was renamed"
    names = {str(path.relative_to(results)) for path in paths}
    for expected in ("seed_pool.jsonl", "reference.jsonl", "round1/probes/instructions.jsonl",
                     "round1/probes/warmup.jsonl", "round1/probes/probing.jsonl", "round1/influence/influence.jsonl",
                     "round1/pairs.jsonl", "round1/montessori/train/responses.jsonl",
                     "round1/self_instruct/train/responses.jsonl"):
        assert expected in names
    for path in paths:
        records = read_jsonl(path)
        assert all(isinstance(record, dict) for record in records), path
    for name in ("round1/probes/probing.jsonl", "round1/influence/influence.jsonl",
                 "round1/montessori/train/responses.jsonl"):
        assert read_jsonl(results / name), f"{name} is empty"
    probing = {record["id"] for record in read_jsonl(results / "round1/probes/probing.jsonl")}
    assert {record["id"] for record in read_jsonl(results / "round1/influence/influence.jsonl")} == probing


@pytest.mark.slow
def test_a_second_identical_run_has_nothing_to_do(finished_tiny_run):
    workdir = finished_tiny_run.workdir
    before = output_mtimes(workdir)
    again = run_snakemake(workdir, *LOCAL_CORES, *SHARED_RUN_CONFIG)
    assert again.returncode == 0, again.stdout
    assert "Nothing to be done" in again.stdout
    assert output_mtimes(workdir) == before


def eval_jobs(config: dict, students: list[str]) -> list[tuple[str, dict]]:
    """The evaluation jobs of `students`: one per rule."""
    return [(rule, {"student": student}) for rule in EVAL_RULES for student in students]


def expected_after_student_swap(config: dict) -> set:
    """Everything downstream of the student: its warm-up and influence, the pairs and the teacher's
    DPO they feed, the DPO'd teacher's training set, every SFT, every evaluation, the analysis
    figures (influence, DPO rewards, that training set's lengths) and the report."""
    k = {"k": "1"}
    trained_set = "montessori/train"
    jobs = [("prepare_model", {"role": "student"}), ("warmup", k), ("merge_influence", k),
            ("preference_pairs", k), ("dpo_teacher", k), ("analysis_figures", {}), ("report", {}), ("all", {}),
            ("remove_warmup", k),
            ("merge_instructions", k | {"set": trained_set}), ("merge_responses", k | {"set": trained_set})]
    jobs += [("influence", k | {"shard": str(s)}) for s in range(config["influence"]["shards"])]
    jobs += [(rule, k | {"set": trained_set, "shard": str(s)})
             for rule in ("synth_instructions", "synth_responses") for s in range(config["synthesis"]["shards"])]
    jobs += [("sft_student", k | {"method": method}) for method in config["methods"]]
    jobs += eval_jobs(config, STUDENTS)
    return {(rule, tuple(sorted(wildcards.items()))) for rule, wildcards in jobs}


@pytest.mark.slow
def test_swapping_the_student_replans_only_what_depends_on_it(finished_tiny_run, tiny_model_dir, tmp_path):
    workdir = finished_tiny_run.workdir
    # The same weights under another name: a local directory is a different student to the config.
    student = tmp_path / "student-copy"
    student.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        (student / item.name).symlink_to(item)
    swap = tmp_path / "swap.yaml"
    swap.write_text(yaml.safe_dump({"models": {"student": str(student)}}))
    config = merged_config(SHARED_RUN_CONFIG, swap)

    dry = run_snakemake(workdir, "--dry-run", *SHARED_RUN_CONFIG, str(swap))
    assert dry.returncode == 0, dry.stdout
    planned = {job.key: job for job in planned_jobs(dry.stdout)}
    expected = expected_after_student_swap(config)
    unexpected = {key: planned[key].reason for key in set(planned) - expected}
    assert not unexpected, f"the swap replans jobs that do not depend on the student: {unexpected}"
    assert not expected - set(planned), f"jobs downstream of the student not replanned: {expected - set(planned)}"
    # The teacher-only sets: the probes and the untrained teacher's self_instruct training set.
    assert not [key for key in planned if dict(key[1]).get("set") in ("probes", "self_instruct/train")]
    assert (workdir / TINY_RESULTS / "models" / "student.json").read_text().count("student-copy") == 0


def dry_run_on_finished_run(workdir, tmp_path, override: dict):
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    dry = run_snakemake(workdir, "--dry-run", *SHARED_RUN_CONFIG, str(path))
    assert dry.returncode == 0, dry.stdout[-4000:]
    return dry


# Every throughput setting (montessori/runtime.py, plus threads and GPU counts, which only reach the
# scheduler), changed at once: if any one of them reached a job's params, the job would be planned.
THROUGHPUT_CHANGES = {
    "synthesis": {"batch_size": 3, "gpu_memory_utilization": 0.5, "api_concurrency": 2},
    "influence": {"batch_size": 3, "gpus_per_shard": 2},
    "evaluation": {"lm_eval": {"batch_size": 1}, "nll": {"batch_size": 3}},
    "compute": {"gpus": 1, "training_gpus": 1, "threads": 2},
    "logging": {"report_to": "tensorboard"},
}


@pytest.mark.slow
def test_changing_throughput_settings_plans_nothing(finished_tiny_run, tmp_path):
    dry = dry_run_on_finished_run(finished_tiny_run.workdir, tmp_path, THROUGHPUT_CHANGES)
    assert "Nothing to be done" in dry.stdout, {job.key: job.reason for job in planned_jobs(dry.stdout)}


def expected_after_pairs_change(config: dict) -> set:
    """pairs.min_margin: the pairs, the teacher's DPO on them, its training set, the montessori
    student and its evaluations, the analysis figures, the report. Not the probes, the influence or
    the baseline."""
    k = {"k": "1"}
    trained = k | {"set": "montessori/train"}
    jobs = [("preference_pairs", k), ("dpo_teacher", k), ("merge_instructions", trained),
            ("merge_responses", trained), ("sft_student", k | {"method": "montessori"}), ("analysis_figures", {}),
            ("report", {}), ("all", {})]
    jobs += [(rule, trained | {"shard": str(s)}) for rule in ("synth_instructions", "synth_responses") for s in (0, 1)]
    jobs += eval_jobs(config, ["montessori-round1"])
    return {(rule, tuple(sorted(wildcards.items()))) for rule, wildcards in jobs}


@pytest.mark.slow
def test_changing_a_result_setting_plans_exactly_its_dependents(finished_tiny_run, tmp_path):
    dry = dry_run_on_finished_run(finished_tiny_run.workdir, tmp_path, {"pairs": {"min_margin": 0.5}})
    planned = {job.key: job.reason for job in planned_jobs(dry.stdout)}
    config = merged_config(SHARED_RUN_CONFIG)
    assert set(planned) == expected_after_pairs_change(config), planned
    assert "params have changed" in planned[("preference_pairs", (("k", "1"),))].lower()


@pytest.mark.slow
def test_the_warmup_checkpoint_is_removed_once_influence_is_merged(finished_tiny_run):
    round1 = finished_tiny_run.results / "round1"
    assert (round1 / "warmup.removed").exists()
    assert not (round1 / "warmup").exists(), "storage.keep.warmup is false in the tiny config"
    assert not (round1 / "warmup.done").exists(), "the sentinel is a temp() output"
    assert (round1 / "influence" / "influence.jsonl").exists()


def dry_run_of_tiny_config(tmp_path, override: dict, *options: str):
    """A dry run of the tiny config with `override` merged over it: (the merged config, the output)."""
    workdir = make_workdir(tmp_path / "work")
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", *options, *TINY, "override.yaml")
    assert dry.returncode == 0, dry.stdout[-3000:]
    return load_config(ROOT / "config.yaml", TINY_CONFIG, workdir / "override.yaml"), dry.stdout


def test_the_judge_signal_rates_the_probes_instead_of_scoring_influence(tmp_path):
    """pairs.signal judge plans the probe judge (and no warm-up or influence); the default signal
    plans no probe judge (test_dry_run_draws_the_whole_dag counts every rule)."""
    config, output = dry_run_of_tiny_config(tmp_path, {"pairs": {"signal": "judge", "rule": "rank"}}, "--printshellcmds")
    assert job_stats(output) == expected_job_counts(config)
    assert job_stats(output)["judge_probes"] == config["rounds"] and "influence" not in job_stats(output)
    pairs = [line for line in output.splitlines() if " preference_pairs " in line]
    assert len(pairs) == 1 and f"--scores {TINY_RESULTS}/round1/probe_judge/scores.jsonl" in pairs[0]
    judge = [line for line in output.splitlines() if " judge_probes " in line]
    assert len(judge) == 1 and f"--judge {TINY_RESULTS}/models/judge.json" in judge[0]


def test_the_loss_signal_reads_the_influence_table(tmp_path):
    config, output = dry_run_of_tiny_config(tmp_path, {"pairs": {"signal": "loss", "rule": "rank"}}, "--printshellcmds")
    assert job_stats(output) == expected_job_counts(config) and "judge_probes" not in job_stats(output)
    pairs = [line for line in output.splitlines() if " preference_pairs " in line]
    assert f"--scores {TINY_RESULTS}/round1/influence/influence.jsonl" in pairs[0]


def test_a_zero_split_rule_with_the_judge_signal_stops_the_plan_naming_the_key(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    (workdir / "override.yaml").write_text(yaml.safe_dump({"pairs": {"signal": "judge", "rule": "sign"}}))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", *TINY, "override.yaml")
    assert dry.returncode != 0 and "config key 'pairs.rule'" in dry.stdout


def test_a_transfer_student_adds_exactly_its_training_and_evaluation_jobs(tmp_path):
    """One transfer student (the embedded model): a card, an SFT per method on that method's set of
    the last round, and every evaluation job per trained student, compared against itself trained
    on Self-Instruct's set; nothing else changes."""
    baseline = job_stats(run_snakemake(make_workdir(tmp_path / "base"), "--workflow-profile", "none",
                                       "--dry-run", *TINY).stdout)
    student = {"name": "smol", "model": "smollm2-135m-instruct", "lr": 3.0e-5}
    config, output = dry_run_of_tiny_config(tmp_path, {"transfer_students": [student]}, "--printshellcmds")
    stats = job_stats(output)
    assert stats == expected_job_counts(config)
    added = {rule: stats[rule] - baseline.get(rule, 0) for rule in stats if stats[rule] != baseline.get(rule, 0)}
    n_methods = len(config["methods"])
    assert added == {"prepare_transfer_model": 1, "sft_transfer_student": n_methods,
                     **{rule: n_methods for rule in EVAL_RULES}}
    jobs = planned_jobs(output)
    trained = sorted(job.wildcards["method"] for job in jobs if job.rule == "sft_transfer_student")
    assert trained == sorted(config["methods"])
    evaluated = {job.wildcards["student"] for job in jobs if job.rule == "eval_score"}
    assert evaluated == set(STUDENTS) | {f"transfer-smol-{method}" for method in config["methods"]}
    lines = output.splitlines()
    last = config["rounds"]
    for method in config["methods"]:
        sft = [line for line in lines if " sft_student " in line and f"/transfer/smol/{method}/" in line]
        assert len(sft) == 1 and f"--data {TINY_RESULTS}/round{last}/{method}/train/responses.jsonl" in sft[0]
        assert f"--student {TINY_RESULTS}/models/transfer-smol.json" in sft[0]
        assert '"lr": 3e-05' in sft[0]                 # the student's own learning rate
    # the transfer student's comparison is itself trained on Self-Instruct's set, not the main student
    versus = [line for line in lines if " eval_judge " in line and "transfer-smol-montessori/alpaca_eval/outputs" in line]
    assert len(versus) == 1
    assert f"self_instruct={TINY_RESULTS}/eval/transfer-smol-self_instruct/alpaca_eval/outputs.json" in versus[0]
