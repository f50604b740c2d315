"""The LLM2LLM baseline (method llm2llm): hard-example selection, the augmentation prompt and its
filters, the training sets, the config keys, the jobs a dry run plans, and one tiny run end to end."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from pipeline_helpers import ROOT, job_stats, make_workdir, planned_jobs, read_jsonl, run_snakemake

from montessori.config import load_config, validate_config
from montessori.errors import ConfigError, DataError
from montessori.io import write_jsonl_atomic
from montessori.llm2llm import (
    augment,
    augmentation_request,
    build_seed_set,
    build_training_set,
    choose_augmentations,
    default_seed_size,
    hard_count,
    select_hard_examples,
)
from montessori.prompts import PROMPT_STYLES, extract_instruction


# ---- hard examples ------------------------------------------------------------------------------
def scored(*losses: float) -> list[dict]:
    return [{"id": f"s{i}", "instruction": f"task {i}", "loss": loss} for i, loss in enumerate(losses)]


def test_the_hard_examples_are_the_highest_losses_hardest_first():
    hard = select_hard_examples(scored(0.5, 2.0, 1.0, 3.0, 0.1), 0.4)
    assert [record["id"] for record in hard] == ["s3", "s1"]


def test_the_hard_count_rounds_up_and_keeps_at_least_one():
    assert hard_count(5, 0.5) == 3
    assert hard_count(4, 0.5) == 2
    assert hard_count(3, 0.01) == 1
    assert hard_count(7, 1.0) == 7
    with pytest.raises(ConfigError, match="llm2llm.hard_fraction"):
        hard_count(4, 0.0)


def test_equal_losses_are_chosen_by_id_whatever_the_file_order():
    records = scored(1.0, 1.0, 1.0, 0.0)
    forward = select_hard_examples(records, 0.5)
    backward = select_hard_examples(list(reversed(records)), 0.5)
    assert [r["id"] for r in forward] == [r["id"] for r in backward] == ["s0", "s1"]


def test_the_default_seed_set_keeps_two_rounds_within_the_training_budget():
    size = default_seed_size(10000)
    assert size == 5000
    after_two_rounds = size + 2 * hard_count(size, 0.5)
    assert after_two_rounds == 10000
    assert default_seed_size(1) == 1


# ---- the augmentation prompt ---------------------------------------------------------------------
@pytest.mark.parametrize("style", list(PROMPT_STYLES.values()), ids=lambda s: s.name)
def test_the_augmentation_prompt_shows_the_seed_in_the_styles_tags(style):
    request = augmentation_request("Explain photosynthesis to a child.", style)
    assert f"{style.open_tag}Explain photosynthesis to a child.{style.close_tag}" in request
    assert "not a copy" in request and "one new instruction" in request
    # what the teacher is asked to reply is what the project's extraction reads back
    reply = f"{style.open_tag}Explain how bees make honey to a child.{style.close_tag}"
    assert extract_instruction(reply, "", style) == ("Explain how bees make honey to a child.", "tagged")


# ---- choosing the augmentations ------------------------------------------------------------------
FILTERS = {"min_chars": 5, "max_chars": 200, "rouge_threshold": 0.7, "banned_words": ["image"]}
STYLE = PROMPT_STYLES["prefill"]


def candidate(seed_id: str, c: int, raw: str) -> dict:
    return {"id": f"r1-{seed_id}-c{c}", "group": f"r1-{seed_id}", "from_seed": seed_id, "prompt": "p",
            "prefill": STYLE.prefill, "raw_output": raw}


def test_each_hard_seed_keeps_its_first_candidate_that_passes_the_filters():
    hard = scored(3.0, 2.0)
    candidates = [
        candidate("s0", 0, "Describe this image in detail.</task>"),         # banned word
        candidate("s0", 1, "Name three rivers in Africa and their lengths.</task>"),
        candidate("s0", 2, "List four planets of the solar system.</task>"),  # a kept sibling before it
        candidate("s1", 0, "task 0</task>"),                                  # copies the training set
        candidate("s1", 1, ""),                                               # ended at once
    ]
    judged, counts = choose_augmentations(hard, candidates, ["task 0", "task 1"], FILTERS, STYLE)
    reasons = {record["id"]: record["reason"] for record in judged}
    assert reasons == {"r1-s0-c0": "banned_word", "r1-s0-c1": None, "r1-s0-c2": "not_needed",
                       "r1-s1-c0": "near_duplicate", "r1-s1-c1": "no_instruction"}
    kept = [record for record in judged if record["kept"]]
    assert kept[0]["instruction"] == "Name three rivers in Africa and their lengths."
    assert kept[0]["seed_instruction"] == "task 0" and kept[0]["seed_loss"] == 3.0
    assert counts["kept"] == len(kept) and counts["banned_word"] == 1 and counts["not_needed"] == 1


def test_a_new_instruction_too_close_to_one_kept_this_round_is_rejected():
    hard = scored(3.0, 2.0)
    candidates = [candidate("s0", 0, "Write a haiku about the autumn rain.</task>"),
                  candidate("s1", 0, "Write a haiku about the autumn rain!</task>")]
    judged, _ = choose_augmentations(hard, candidates, [], FILTERS, STYLE)
    assert [record["reason"] for record in judged] == [None, "near_duplicate"]


NEW_TASKS = {"task 0": "Name three rivers in Africa.", "task 1": "Explain how a bicycle gear works.",
             "task 2": "Describe the water cycle to a child."}


class FakeGenerator:
    """Answers each seed's prompt with n tasks of its own; records every call."""

    supports_prefill = True

    def __init__(self):
        self.calls: list[tuple[list[str], list[int]]] = []

    def chat_prompt(self, user_text: str, prefill: str = "") -> str:
        return f"<user>{user_text}<assistant>{prefill}"

    def generate(self, prompts, sampling, n, seeds):
        self.calls.append((list(prompts), list(seeds)))
        outputs = []
        for prompt in prompts:
            topic = re.search(r"\n<task>(.*?)</task>\n", prompt).group(1)   # the seed, on a line of its own
            outputs.append([f"{NEW_TASKS[topic]} Use {c + 2} sentences.</task>" for c in range(n)])
        return outputs


def augment_settings(**overrides) -> dict:
    return {"label": "r1-llm2llm-augment", "seed": 7, "n": 2, "batch_size": 1,
            "instruction_sampling": {"temperature": 1.0, "max_new_tokens": 20}, "prompt_style": "prefill",
            "filters": FILTERS, **overrides}


def test_the_augment_stage_prompts_with_the_hard_seeds_only_and_resumes(tmp_path):
    hard = tmp_path / "hard.jsonl"
    write_jsonl_atomic(hard, [{**record, "rank": i} for i, record in
                              enumerate(select_hard_examples(scored(1.0, 4.0, 2.0), 0.5), start=1)])
    training = tmp_path / "train.jsonl"
    write_jsonl_atomic(training, [{"id": "s0", "instruction": "task 0", "response": "r"}])
    out, summary, candidates = tmp_path / "instructions.jsonl", tmp_path / "summary.json", tmp_path / "cand.jsonl"
    fake = FakeGenerator()
    augment(augment_settings(), str(hard), "teacher.json", str(training), str(candidates), str(out), str(summary),
            generator_factory=lambda: fake)
    prompts = [prompt for prompts, _ in fake.calls for prompt in prompts]
    assert len(prompts) == 2 and "task 1" in prompts[0] and "task 2" in prompts[1]   # hardest first
    assert not any("task 0" in prompt for prompt in prompts)
    kept = read_jsonl(out)
    assert [record["from_seed"] for record in kept] == ["s1", "s2"]
    assert [record["instruction"] for record in kept] == [
        "Explain how a bicycle gear works. Use 2 sentences.", "Describe the water cycle to a child. Use 2 sentences."]
    assert json.loads(summary.read_text())["kept"] == 2
    # a rerun with the candidates on disk generates nothing and writes the same instructions
    again = FakeGenerator()
    augment(augment_settings(batch_size=4), str(hard), "teacher.json", str(training), str(candidates), str(out),
            str(summary), generator_factory=lambda: again)
    assert again.calls == [] and read_jsonl(out) == kept


def test_the_seeds_of_a_hard_example_do_not_depend_on_the_batch(tmp_path):
    hard = tmp_path / "hard.jsonl"
    write_jsonl_atomic(hard, select_hard_examples(scored(1.0, 4.0, 2.0), 1.0))
    training = tmp_path / "train.jsonl"
    write_jsonl_atomic(training, [])
    seeds = []
    for batch_size in (1, 3):
        fake = FakeGenerator()
        augment(augment_settings(batch_size=batch_size), str(hard), "t", str(training),
                str(tmp_path / f"c{batch_size}.jsonl"), str(tmp_path / "o.jsonl"), str(tmp_path / "s.json"),
                generator_factory=lambda fake=fake: fake)
        seeds.append([seed for _, call_seeds in fake.calls for seed in call_seeds])
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 3


# ---- seed set and training sets ------------------------------------------------------------------
def test_the_seed_set_is_a_seeded_sample_of_the_pool(tmp_path):
    pool = tmp_path / "seed_pool.jsonl"
    write_jsonl_atomic(pool, [{"id": f"seed-{i:05d}", "text": f"instruction {i}"} for i in range(20)])
    first, second, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    build_seed_set({"seed_size": 5, "seed": 1}, str(pool), str(first))
    build_seed_set({"seed_size": 5, "seed": 1}, str(pool), str(second))
    build_seed_set({"seed_size": 5, "seed": 2}, str(pool), str(other))
    records = read_jsonl(first)
    assert records == read_jsonl(second) and records != read_jsonl(other)
    assert len({record["seed_id"] for record in records}) == 5
    assert all(record["instruction"] == f"instruction {int(record['seed_id'][5:])}" for record in records)
    with pytest.raises(ConfigError, match="llm2llm.seed_size"):
        build_seed_set({"seed_size": 21, "seed": 1}, str(pool), str(first))


def test_the_training_set_grows_by_the_answered_augmentations(tmp_path):
    previous, added, out = tmp_path / "prev.jsonl", tmp_path / "added.jsonl", tmp_path / "out.jsonl"
    write_jsonl_atomic(previous, [{"id": "a", "instruction": "x", "response": "y"}])
    write_jsonl_atomic(added, [{"id": "b", "instruction": "z", "response": "w"}])
    build_training_set({}, str(previous), str(out), str(added))
    assert [record["id"] for record in read_jsonl(out)] == ["a", "b"]
    build_training_set({}, str(previous), str(out))
    assert [record["id"] for record in read_jsonl(out)] == ["a"]
    with pytest.raises(DataError, match="added twice"):
        build_training_set({}, str(previous), str(out), str(previous))


# ---- config --------------------------------------------------------------------------------------
def config_with(**overrides) -> dict:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config.update(overrides)
    return config


def test_the_llm2llm_section_defaults_and_accepts_the_method():
    config = validate_config(config_with(methods=["self_instruct", "llm2llm"]))
    assert config["llm2llm"] == {"seed_size": None, "hard_fraction": 0.5}


@pytest.mark.parametrize("section, key", [({"hard_fraction": 0}, "llm2llm.hard_fraction"),
                                          ({"hard_fraction": 1.5}, "llm2llm.hard_fraction"),
                                          ({"seed_size": 0}, "llm2llm.seed_size"),
                                          ({"seed_size": 2.5}, "llm2llm.seed_size"),
                                          ({"hard_examples": 3}, "llm2llm.hard_examples")])
def test_bad_llm2llm_settings_name_the_key(section, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate_config(config_with(methods=["llm2llm"], llm2llm=section))


# ---- the plan ------------------------------------------------------------------------------------
def dry_run(tmp_path, override: dict, *configs: str):
    workdir = make_workdir(tmp_path / "work")
    (workdir / "presets").symlink_to(ROOT / "presets")
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", "--printshellcmds",
                        "--configfile", *configs, "override.yaml")
    assert dry.returncode == 0, dry.stdout[-3000:]
    return dry.stdout


def shell_line(output: str, stage: str, containing: str) -> list[str]:
    lines = [line for line in output.splitlines() if f" -m montessori {stage} " in line and containing in line]
    assert len(lines) == 1, f"{len(lines)} {stage} commands with {containing!r}"
    return shlex.split(lines[0].split(" > ")[0])


def option(words: list[str], name: str) -> list[str]:
    start = words.index(name) + 1
    end = next((i for i in range(start, len(words)) if words[i].startswith("--")), len(words))
    return words[start:end]


def test_two_rounds_plan_llm2llm_beside_the_other_methods(tmp_path):
    override = {"methods": ["montessori", "self_instruct", "llm2llm"], "rounds": 2}
    output = dry_run(tmp_path, override, "config.yaml", "tests/configs/tiny.yaml")
    stats = job_stats(output)
    r = "results/tiny"
    assert {rule: stats[rule] for rule in ("llm2llm_seeds", "llm2llm_training_set", "llm2llm_hard_examples",
                                           "llm2llm_augment", "sft_student")} == {
        "llm2llm_seeds": 1, "llm2llm_training_set": 3, "llm2llm_hard_examples": 2, "llm2llm_augment": 2,
        "sft_student": 2 * 2 + 3}    # montessori and self_instruct each round; llm2llm rounds 0, 1, 2
    jobs = planned_jobs(output)
    answered = sorted((job.wildcards["k"], job.wildcards["set"]) for job in jobs
                      if job.rule == "merge_responses" and job.wildcards["set"].startswith("llm2llm"))
    assert answered == [("0", "llm2llm/seeds"), ("1", "llm2llm/augment"), ("2", "llm2llm/augment")]
    students = {job.wildcards["student"] for job in jobs if job.rule == "eval_score"}
    assert {"llm2llm-round1", "llm2llm-round2"} <= students and "llm2llm-round0" not in students
    # every round retrains the untrained student on that round's whole set
    for k in (0, 1, 2):
        sft = shell_line(output, "sft_student", f"--done {r}/round{k}/llm2llm/student.done")
        assert option(sft, "--student") == [f"{r}/models/student.json"]
        assert option(sft, "--data") == [f"{r}/round{k}/llm2llm/train/responses.jsonl"]
    # round k scores the seed set with round k-1's student and augments from the untrained teacher
    for k in (1, 2):
        hard = shell_line(output, "llm2llm_hard_examples", f"--out {r}/round{k}/llm2llm/hard.jsonl")
        assert option(hard, "--student") == [f"{r}/round{k - 1}/llm2llm/student.done"]
        assert option(hard, "--seeds") == [f"{r}/round0/llm2llm/seeds/responses.jsonl"]
        new = shell_line(output, "llm2llm_augment", f"--hard {r}/round{k}/llm2llm/hard.jsonl")
        assert option(new, "--teacher") == [f"{r}/models/teacher.json"]
        assert option(new, "--training-set") == [f"{r}/round{k - 1}/llm2llm/train/responses.jsonl"]
        grown = shell_line(output, "llm2llm_training_set", f"--out {r}/round{k}/llm2llm/train/responses.jsonl")
        assert option(grown, "--previous") == [f"{r}/round{k - 1}/llm2llm/train/responses.jsonl"]
        assert option(grown, "--added") == [f"{r}/round{k}/llm2llm/augment/responses.jsonl"]
        answers = shell_line(output, "synth_responses", f"--out {r}/round{k}/llm2llm/augment/responses.shard-0.jsonl")
        assert option(answers, "--teacher") == [f"{r}/models/teacher.json"]
    seeds = shell_line(output, "llm2llm_seeds", "--seed-pool")
    assert json.loads(option(seeds, "--settings")[0])["seed_size"] == 2    # tiny train_set.size 4 // 2


def test_the_default_config_plans_no_llm2llm_job(tmp_path):
    output = dry_run(tmp_path, {}, "config.yaml", "tests/configs/tiny.yaml")
    assert not [rule for rule in job_stats(output) if rule.startswith("llm2llm")]


def test_the_8b_preset_plans_llm2llm(tmp_path):
    config = load_config(ROOT / "config.yaml", ROOT / "presets" / "llama3-8b.yaml")
    override = {"methods": [*config["methods"], "llm2llm"], "rounds": 2}
    output = dry_run(tmp_path, override, "presets/llama3-8b.yaml")
    stats = job_stats(output)
    assert stats["llm2llm_hard_examples"] == 2 and stats["llm2llm_augment"] == 2
    assert stats["sft_student"] == 2 * len(config["methods"]) + 3
    seeds = shell_line(output, "llm2llm_seeds", "--seed-pool")
    assert json.loads(option(seeds, "--settings")[0])["seed_size"] == config["train_set"]["size"] // 2
    jobs = planned_jobs(output)
    gpus = {job.resources.get("gpu") for job in jobs if job.rule in ("llm2llm_hard_examples", "llm2llm_augment")}
    assert gpus == {str(config["compute"]["gpus"])}
