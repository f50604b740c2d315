"""The teacher-optimization ablation (config teacher_optimization, docs/methods.md): response
records and their pairs, the bootstrap selection and its tokenization, config validation, the
jobs each value plans, and one tiny run end to end with dpo_responses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import (
    ROOT,
    TINY,
    TINY_CONFIG,
    TINY_RESULTS,
    job_stats,
    make_workdir,
    read_jsonl,
    run_snakemake,
)

from montessori.chat import IGNORE_INDEX
from montessori.config import load_config
from montessori.errors import ConfigError, DataError
from montessori.io import write_jsonl_atomic
from montessori.pairs import build_pairs
from montessori.synthesis import merge_responses, response_ids, response_records, synthesize_responses
from montessori.teacheropt import bootstrap_records, build_bootstrap_set, verbatim_examples


# --- dpo_responses: several responses per instruction, grouped by instruction ------------------

def instruction_record(record_id: str, group: str) -> dict:
    return {"id": record_id, "group": group, "prompt": f"<write instructions {group}>",
            "raw_output": f"raw {record_id}", "instruction": f"Explain {record_id}.", "kept": True}


def test_one_response_keeps_the_instruction_record_as_it_was():
    record = instruction_record("p-g0-c0", "p-g0")
    assert response_ids("p-g0-c0", 1) == ["p-g0-c0"]
    assert response_records(record, "<answer prompt>", [" An answer. "]) == [
        {**record, "response": "An answer.", "response_raw": " An answer. "}]


def test_several_responses_form_a_group_of_their_own_keyed_by_the_instruction():
    record = instruction_record("p-g0-c1", "p-g0")
    answered = response_records(record, "<answer prompt>", ["first", "second", "third"])
    assert [one["id"] for one in answered] == ["p-g0-c1-r0", "p-g0-c1-r1", "p-g0-c1-r2"]
    for one, raw in zip(answered, ["first", "second", "third"]):
        assert one["group"] == "p-g0-c1" and one["instruction_id"] == "p-g0-c1"
        assert one["prompt"] == "<answer prompt>" and one["raw_output"] == raw == one["response"]
        assert one["instruction"] == record["instruction"]
        assert (one["instruction_group"], one["instruction_prompt"], one["instruction_raw_output"]) == (
            "p-g0", record["prompt"], record["raw_output"])


class FakeTeacher:
    """Answers each prompt n times with text naming the prompt and the completion's index; records
    the calls (prompts, n, seeds)."""

    supports_prefill = False

    def __init__(self):
        self.calls = []

    def chat_prompt(self, user_text: str, prefill: str = "") -> str:
        return f"<user>{user_text}<assistant>"

    def generate(self, prompts, sampling, n, seeds):
        self.calls.append((list(prompts), n, list(seeds)))
        return [[f"answer {c} to {prompt}" for c in range(n)] for prompt in prompts]


def test_synthesized_responses_are_n_per_instruction_and_merge_in_order(tmp_path):
    instructions = tmp_path / "instructions.jsonl"
    write_jsonl_atomic(instructions,
                       [instruction_record(f"p-g{g}-c{c}", f"p-g{g}") for g in range(2) for c in range(2)])
    settings = {"label": "r1-probes", "shards": 2, "seed": 1, "batch_size": 1, "responses_per_instruction": 3,
                "response_sampling": {"temperature": 0.6, "max_new_tokens": 8}}
    teacher = FakeTeacher()
    shards = [tmp_path / f"responses.shard-{shard}.jsonl" for shard in range(2)]
    for shard, path in enumerate(shards):
        synthesize_responses(settings, str(instructions), "unused-card", str(path), shard=shard,
                             generator_factory=lambda: teacher)
    assert {n for _, n, _ in teacher.calls} == {3}
    merged = tmp_path / "responses.jsonl"
    merge_responses({"responses_per_instruction": 3}, [str(p) for p in shards], str(instructions), str(merged))
    records = read_jsonl(merged)
    assert [r["id"] for r in records] == [f"p-g{g}-c{c}-r{j}" for g in range(2) for c in range(2) for j in range(3)]
    for record in records:
        assert record["prompt"] == f"<user>{record['instruction']}<assistant>"
        assert record["response"].startswith(f"answer {record['id'][-1]} to ")
    with pytest.raises(DataError, match="expected ids missing"):
        merge_responses({}, [str(p) for p in shards], str(instructions), str(tmp_path / "one-each.jsonl"))


def test_response_pairs_never_cross_instructions_and_prompt_the_teacher_to_answer(tmp_path):
    """The unchanged pairs stage on response records: chosen and rejected are two responses to one
    instruction, under the prompt that asked the teacher for that response."""
    records, scores = [], []
    for c in range(2):
        record = instruction_record(f"p-g0-c{c}", "p-g0")
        answered = response_records(record, f"<user>{record['instruction']}<assistant>", ["a", "b", "c"])
        records += answered
        # instruction c0: response r1 best; instruction c1: r2 best
        best = 1 if c == 0 else 2
        scores += [{"id": one["id"], "influence": -1.0 if j == best else float(j)} for j, one in enumerate(answered)]
    write_jsonl_atomic(tmp_path / "probing.jsonl", records)
    write_jsonl_atomic(tmp_path / "influence.jsonl", scores)
    build_pairs({"signal": "influence", "rule": "rank"}, str(tmp_path / "influence.jsonl"),
                str(tmp_path / "probing.jsonl"), str(tmp_path / "pairs.jsonl"), str(tmp_path / "summary.json"))
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert [(p["group"], p["chosen_id"], p["rejected_id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p-g0-c0", "p-g0-c0-r1", "p-g0-c0-r2", "b", "c"),
        ("p-g0-c1", "p-g0-c1-r2", "p-g0-c1-r1", "c", "b"),
    ]
    assert [p["prompt"] for p in pairs] == ["<user>Explain p-g0-c0.<assistant>", "<user>Explain p-g0-c1.<assistant>"]


# --- bootstrap: the helpful candidates and how they are tokenized -----------------------------

def pair(chosen: str, rejected: str, group: str = "g0") -> dict:
    return {"id": f"{chosen}>{rejected}", "group": group, "prompt": f"<prompt {group}>", "chosen": f"text {chosen}",
            "rejected": f"text {rejected}", "chosen_id": chosen, "rejected_id": rejected,
            "chosen_score": -0.5, "rejected_score": 0.5}


def test_bootstrap_takes_each_chosen_candidate_once_and_never_a_rejected_one():
    pairs = [pair("c0", "c2"), pair("c0", "c3"), pair("c1", "c2"), pair("d0", "d1", group="g1")]
    records = bootstrap_records(pairs)
    assert [(r["id"], r["group"], r["prompt"], r["completion"]) for r in records] == [
        ("c0", "g0", "<prompt g0>", "text c0"), ("c1", "g0", "<prompt g0>", "text c1"),
        ("d0", "g1", "<prompt g1>", "text d0")]
    assert {"c2", "c3", "d1"}.isdisjoint(r["id"] for r in records)


def test_bootstrap_set_stage_writes_its_records_and_refuses_an_empty_pairs_file(tmp_path):
    write_jsonl_atomic(tmp_path / "pairs.jsonl", [pair("c0", "c1"), pair("c0", "c2")])
    build_bootstrap_set({}, str(tmp_path / "pairs.jsonl"), str(tmp_path / "set.jsonl"), str(tmp_path / "summary.json"))
    assert [r["id"] for r in read_jsonl(tmp_path / "set.jsonl")] == ["c0"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"pairs": 2, "examples": 1, "groups": 1}
    write_jsonl_atomic(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no preference pairs"):
        build_bootstrap_set({}, str(tmp_path / "empty.jsonl"), str(tmp_path / "x.jsonl"), str(tmp_path / "y.json"))
    write_jsonl_atomic(tmp_path / "broken.jsonl", [{**pair("c0", "c1"), "chosen": ""}])
    with pytest.raises(DataError, match="'chosen'"):
        build_bootstrap_set({}, str(tmp_path / "broken.jsonl"), str(tmp_path / "x.jsonl"), str(tmp_path / "y.json"))


class WordTokenizer:
    """One token per word or `<eot>` (ids from a growing vocabulary); `<eot>` closes a turn."""

    eos_token = "<eot>"
    all_special_ids = [0]
    added_tokens_decoder = {}

    def __init__(self):
        self.vocab = {"<eot>": 0}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(word, len(self.vocab))
                              for word in re.findall(r"<eot>|[^\s<]+", text)]}

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"{m['role']}: {m['content']} <eot> " for m in messages)

    def convert_ids_to_tokens(self, token_id):
        return {v: k for k, v in self.vocab.items()}[token_id]


def test_bootstrap_examples_learn_the_completion_only_and_skip_prompts_that_fill_max_length(tmp_path):
    write_jsonl_atomic(tmp_path / "set.jsonl", [
        {"id": "a", "prompt": "p1 p2 p3", "completion": "x y"},
        {"id": "b", "prompt": "q1 q2 q3 q4 q5 q6", "completion": "z"},
    ])
    tokenizer = WordTokenizer()
    examples = verbatim_examples(tmp_path / "set.jsonl", tokenizer, max_length=6)
    assert len(examples) == 1        # b's prompt alone fills max_length
    ids = tokenizer.vocab
    assert examples[0]["input_ids"] == [ids["p1"], ids["p2"], ids["p3"], ids["x"], ids["y"], ids["<eot>"]]
    assert examples[0]["labels"] == [IGNORE_INDEX] * 3 + [ids["x"], ids["y"], ids["<eot>"]]
    with pytest.raises(ConfigError, match="'dpo.max_length'"):
        verbatim_examples(tmp_path / "set.jsonl", tokenizer, max_length=3)


def test_bootstrap_teacher_stage_fine_tunes_the_teacher_and_writes_the_dpo_card(tmp_path, tiny_model_dir):
    """The SFT trainer of training.py on verbatim prompts: the card, the loss record and new weights."""
    from safetensors.torch import load_file

    from montessori.chat import chat_prompt
    from montessori.models import load_tokenizer, write_model_card
    from montessori.teacheropt import train_bootstrap

    tokenizer = load_tokenizer(tiny_model_dir)
    write_jsonl_atomic(tmp_path / "set.jsonl", [
        {"id": f"c{i}", "group": f"g{i}", "prompt": chat_prompt(tokenizer, f"Write a new task like example {i}."),
         "completion": f"Describe a river in {i + 2} words.", "score": -0.1} for i in range(4)])
    examples = verbatim_examples(tmp_path / "set.jsonl", tokenizer, 512)
    first_prompt = tokenizer(read_jsonl(tmp_path / "set.jsonl")[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert examples[0]["input_ids"][:len(first_prompt)] == first_prompt
    assert examples[0]["labels"][:len(first_prompt)] == [IGNORE_INDEX] * len(first_prompt)
    assert tokenizer.decode(examples[0]["labels"][len(first_prompt):]).startswith("Describe a river in 2 words.")

    card = tmp_path / "teacher.json"
    write_model_card(card, tiny_model_dir)
    out_dir, done = tmp_path / "teacher", tmp_path / "teacher.done"
    settings = {"lr": 1e-3, "epochs": 1, "batch_size": 2, "effective_batch": 2, "max_length": 512,
                "schedule": {"warmup": 0.1, "stable": 0.5, "decay": 0.4, "min_lr_ratio": 0.001}, "seed": 7}
    train_bootstrap(settings, teacher=str(card), data=str(tmp_path / "set.jsonl"), out_dir=str(out_dir),
                    done=str(done), loss_json=str(tmp_path / "loss.json"), loss_png=str(tmp_path / "loss.png"))
    record = json.loads(done.read_text())
    assert record["path"] == str(out_dir) and record["stage"] == "bootstrap" and record["steps"] == 2
    assert json.loads((tmp_path / "loss.json").read_text())["steps"] == 2
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(out_dir / "model.safetensors"))
    assert any(not before[name].equal(after[name]) for name in before)


# --- config ---------------------------------------------------------------------------------

def write_config(tmp_path, override: dict):
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return load_config(ROOT / "config.yaml", TINY_CONFIG, path)


def test_the_default_is_the_paper_s_dpo_on_instructions(tmp_path):
    assert write_config(tmp_path, {})["teacher_optimization"] == "dpo_instructions"


def test_an_unknown_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'teacher_optimization'"):
        write_config(tmp_path, {"teacher_optimization": "dpo_everything"})


def test_response_pairs_need_two_responses_per_instruction(tmp_path):
    with pytest.raises(ConfigError, match="'synthesis.n'.*at least 2"):
        write_config(tmp_path, {"teacher_optimization": "dpo_responses", "synthesis": {"n": 1}})


# --- the jobs each value plans (dry runs of the tiny config) ----------------------------------

def dry_run(tmp_path, override: dict | None) -> str:
    workdir = make_workdir(tmp_path / "work")
    files = list(TINY)
    if override is not None:
        (workdir / "override.yaml").write_text(yaml.safe_dump(override))
        files.append("override.yaml")
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", "--printshellcmds", *files)
    assert dry.returncode == 0, dry.stdout[-3000:]
    return dry.stdout


def planned_commands(output: str) -> list[str]:
    """Every planned job's shell command (settings included), sorted: Snakemake's print order varies."""
    return sorted(re.findall(r"^Shell command: (.*)$", output, re.MULTILINE))


def commands_of(output: str, stage: str) -> list[str]:
    return [command for command in planned_commands(output) if f" -m montessori {stage} " in command]


def test_the_explicit_default_plans_the_same_jobs_and_commands_as_no_key(tmp_path):
    """The key was added with a default that changes nothing: no job, input or setting differs.
    (Against the code before the key: measured once by hand, see the branch's report.)"""
    without = dry_run(tmp_path / "without", None)
    explicit = dry_run(tmp_path / "explicit", {"teacher_optimization": "dpo_instructions"})
    assert job_stats(without) == job_stats(explicit)
    assert planned_commands(without) == planned_commands(explicit)
    assert "responses_per_instruction" not in without and "teacher_optimization" not in without
    assert "bootstrap" not in job_stats(without)


def test_dpo_responses_plans_the_same_jobs_with_n_responses_per_probing_instruction(tmp_path):
    default = dry_run(tmp_path / "default", None)
    output = dry_run(tmp_path / "responses", {"teacher_optimization": "dpo_responses"})
    assert job_stats(output) == job_stats(default)
    n = load_config(ROOT / "config.yaml", TINY_CONFIG)["synthesis"]["n"]
    for stage in ("synth_responses", "merge_responses"):
        for command in commands_of(output, stage):
            probes = "/round1/probes/" in command
            assert (f'"responses_per_instruction": {n}' in command) == probes, command
    # every instruction is the untrained teacher's; the responses of the training set the DPO teacher's
    for command in commands_of(output, "synth_instructions"):
        assert f"--teacher {TINY_RESULTS}/models/teacher.json " in command, command
    montessori_answers = [c for c in commands_of(output, "synth_responses") if "/montessori/train/" in c]
    assert montessori_answers and all(f"--teacher {TINY_RESULTS}/round1/teacher.done " in c for c in montessori_answers)
    assert len(commands_of(output, "dpo_teacher")) == 1
    assert '"teacher_optimization": "dpo_responses"' in commands_of(output, "report")[0]


def test_bootstrap_replaces_dpo_by_an_sft_of_the_teacher_on_its_helpful_candidates(tmp_path):
    default = dry_run(tmp_path / "default", None)
    output = dry_run(tmp_path / "bootstrap", {"teacher_optimization": "bootstrap"})
    expected = job_stats(default)
    del expected["dpo_teacher"]
    assert job_stats(output) == expected | {"bootstrap_set": 1, "bootstrap_teacher": 1}
    (teacher,) = commands_of(output, "bootstrap_teacher")
    assert f"--data {TINY_RESULTS}/round1/bootstrap/set.jsonl" in teacher
    assert f"--done {TINY_RESULTS}/round1/teacher.done" in teacher and '"beta"' not in teacher
    assert '"lr": 1e-06' in teacher          # the dpo section's optimizer settings
    assert f"--pairs {TINY_RESULTS}/round1/pairs.jsonl" in commands_of(output, "bootstrap_set")[0]
    # the montessori training set is written by the bootstrapped teacher, as by a DPO teacher
    for command in commands_of(output, "synth_instructions") + commands_of(output, "synth_responses"):
        if "/montessori/train/" in command:
            assert f"--teacher {TINY_RESULTS}/round1/teacher.done " in command
    # no DPO, so no DPO reward figure
    (figures,) = commands_of(output, "analysis_figures")
    assert "--dpo-rewards-png" not in figures and "--dpo-rewards-png" in commands_of(default, "analysis_figures")[0]


def job_input(output: str, rule: str, wildcards: str) -> str:
    """The `input:` line of the planned job of `rule` with exactly these wildcards."""
    for block in re.split(r"\n(?:local)?rule ", output):
        if block.startswith(f"{rule}:") and re.search(rf"\n\s+wildcards: {re.escape(wildcards)}\n", block):
            return re.search(r"\n\s+input: (.*)", block).group(1)
    raise AssertionError(f"no planned {rule} job with wildcards {wildcards}")


@pytest.mark.parametrize("variant", ["dpo_responses", "bootstrap"])
def test_round_two_starts_from_round_one_s_teacher(tmp_path, variant):
    workdir = make_workdir(tmp_path / "work")
    (workdir / "override.yaml").write_text(yaml.safe_dump({"teacher_optimization": variant}))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "-n", f"{TINY_RESULTS}/round2/montessori/student.done",
                        *TINY, "tests/configs/two-rounds.yaml", "override.yaml")
    assert dry.returncode == 0, dry.stdout[-3000:]
    trainer = "dpo_teacher" if variant == "dpo_responses" else "bootstrap_teacher"
    assert f"{TINY_RESULTS}/round1/teacher.done" in job_input(dry.stdout, trainer, "k=2")
    assert f"{TINY_RESULTS}/round1/teacher.done" in job_input(dry.stdout, "synth_responses", "k=2, set=probes, shard=0")
    instructions_teacher = job_input(dry.stdout, "synth_instructions", "k=2, set=probes, shard=0")
    if variant == "dpo_responses":
        assert f"{TINY_RESULTS}/models/teacher.json" in instructions_teacher
    else:
        assert f"{TINY_RESULTS}/round1/teacher.done" in instructions_teacher
