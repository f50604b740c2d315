"""Synthesis stages: shard logic, resume after a kill, merges, split; one run on the real 135M teacher."""

from __future__ import annotations

import json
import random

import pytest

from montessori.errors import DataError
from montessori.generation import Generator, prompt_seeds
from montessori.io import read_jsonl, write_jsonl_atomic
from montessori.models import write_model_card
from montessori.seeding import derive_seed
from montessori.synthesis import (merge_instructions, merge_responses, split_probes, synthesize_instructions,
                                  synthesize_responses)

WORDS = ("apple river theory music engine garden history planet poem budget recipe language market storm "
         "bridge puzzle museum forest protein island ladder violin desert harbor comet glacier").split()
SAMPLING = {"temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.1, "presence_penalty": 0.0,
            "max_new_tokens": 16}
FILTERS = {"min_chars": 5, "max_chars": 400, "rouge_threshold": 0.7,
           "banned_words": ["image", "graph", "picture", "file", "map", "draw", "plot", "go to"]}


class ScriptedTeacher(Generator):
    """A deterministic stand-in for the teacher: output depends only on (seed, prompt, position, candidate).

    Mixes well-formed, unclosed, empty, banned, too short, badly started and copied outputs, so
    every filter fires. Counts the prompts it is asked for, to check what a resume regenerates.
    """

    name = "scripted"

    def __init__(self):
        self.prompts_generated = 0

    def chat_prompt(self, user_text: str, prefill: str = "") -> str:
        return f"<user>{user_text}</user><assistant>{prefill}"

    def generate(self, prompts, sampling, n, seed):
        self.prompts_generated += len(prompts)
        outputs = []
        for prompt, prompt_seed in zip(prompts, prompt_seeds(seed, len(prompts))):
            texts = []
            for c in range(n):
                rng = random.Random(derive_seed(prompt_seed, prompt, c))
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 9)))
                texts.append(rng.choice([
                    "", "Ok.</task>", f"Draw a {words}.</task>", f"- {words}</task>",
                    "Write a poem about the same apple river theory music.</task>",
                    f"Explain the {words}\n\nAnswer: because", f"Describe the {words}.</task> and then <task>",
                    f"<task>Compare the {words}.</task>",
                ]))
            outputs.append(texts)
        return outputs


@pytest.fixture()
def seed_pool(tmp_path, shared_data):
    rows = json.loads((shared_data / "seeds" / "alpaca_gpt4_demo_1k.json").read_text())[:60]
    path = tmp_path / "seed_pool.jsonl"
    texts = [row["instruction"] + (" " + row["input"] if row["input"] else "") for row in rows]
    write_jsonl_atomic(path, [{"id": f"seed-{i:05d}", "text": text} for i, text in enumerate(texts)])
    return path


def instruction_settings(**overrides) -> dict:
    settings = {"label": "r1-probes", "target": 24, "shards": 2, "seed": 42, "n": 4, "batch_size": 3,
                "prompt_examples": 8, "generated_examples": 2, "generated_pool_refresh": 3, "oversample": 1.5, "max_prompts_factor": 6,
                "instruction_sampling": SAMPLING, "filters": FILTERS, "backend": "transformers",
                "external_teacher": None}
    return {**settings, **overrides}


def run_shard(settings, seed_pool, out, shard=0, teacher=None):
    teacher = teacher or ScriptedTeacher()
    synthesize_instructions(settings, str(seed_pool), "unused-card.json", str(out), shard,
                            generator_factory=lambda: teacher)
    return teacher


def test_instruction_shard_records(tmp_path, seed_pool):
    out = tmp_path / "shard-0.jsonl"
    run_shard(instruction_settings(), seed_pool, out)
    records = read_jsonl(out)
    kept = [record for record in records if record["kept"]]
    assert len(kept) >= 18  # ceil(24 * 1.5 / 2)
    assert len(records) % 4 == 0  # whole groups of 4 candidates
    assert len(kept) - sum(record["kept"] for record in records[-4:]) < 18, "it stops at the group that met the quota"
    reasons = {record["reason"] for record in records}
    assert {None, "no_instruction", "too_short", "banned_word", "leading_char", "near_duplicate"} <= reasons
    first = records[0]
    assert first["id"] == "r1-probes-s0-g0000-c0" and first["group"] == "r1-probes-s0-g0000"
    assert first["prompt"].endswith("<assistant><task>") and first["shard"] == 0
    assert set(first) >= {"id", "group", "prompt", "raw_output", "instruction", "kept", "reason", "examples"}
    by_group: dict = {}
    for record in records:
        by_group.setdefault(record["group"], []).append(record)
    assert all(len(group) == 4 and len({r["prompt"] for r in group}) == 1 for group in by_group.values())
    # 8 seeds while fewer than 2 were generated, then 6 seeds and 2 earlier kept instructions
    first_batch_examples = [record["examples"] for record in records[:12]]
    assert all(len(ex) == 8 and all(e.startswith("seed-") for e in ex) for ex in first_batch_examples)
    later = records[-1]["examples"]
    assert len(later) == 8 and sum(not e.startswith("seed-") for e in later) == 2
    kept_ids = {record["id"] for record in kept}
    assert all(e in kept_ids for e in later if not e.startswith("seed-"))
    # the case of the teacher's text is kept, and the unclosed task was cut before the answer
    assert any(r["instruction"].startswith("Explain the ") and "Answer" not in r["instruction"] for r in kept)


def test_instruction_shard_does_not_depend_on_the_batch_size(tmp_path, seed_pool):
    """batch_size is a throughput setting (montessori.runtime): same records whatever it is; a batch
    never crosses a pool block (generated_pool_refresh), whose prompts share one pool of examples."""
    outputs = {}
    for batch_size in (1, 2, 3, 5, 64):
        out = tmp_path / f"batch-{batch_size}.jsonl"
        run_shard(instruction_settings(batch_size=batch_size), seed_pool, out)
        outputs[batch_size] = out.read_bytes()
    assert len(set(outputs.values())) == 1
    refreshed = tmp_path / "refresh-4.jsonl"
    run_shard(instruction_settings(generated_pool_refresh=4), seed_pool, refreshed)
    assert refreshed.read_bytes() != outputs[3], "the pool block is result-bearing"


def test_instruction_shards_differ_and_runs_repeat(tmp_path, seed_pool):
    settings = instruction_settings()
    run_shard(settings, seed_pool, tmp_path / "a0.jsonl", 0)
    run_shard(settings, seed_pool, tmp_path / "b0.jsonl", 0)
    run_shard(settings, seed_pool, tmp_path / "a1.jsonl", 1)
    assert (tmp_path / "a0.jsonl").read_bytes() == (tmp_path / "b0.jsonl").read_bytes()
    shard0 = [r["instruction"] for r in read_jsonl(tmp_path / "a0.jsonl") if r["kept"]]
    shard1 = [r["instruction"] for r in read_jsonl(tmp_path / "a1.jsonl") if r["kept"]]
    assert shard0 != shard1


@pytest.mark.parametrize("fraction", [0.05, 0.37, 0.5, 0.93])
def test_instruction_shard_resume_after_kill_is_identical(tmp_path, seed_pool, fraction):
    settings = instruction_settings()
    complete = tmp_path / "complete.jsonl"
    full_run = run_shard(settings, seed_pool, complete)
    data = complete.read_bytes()
    # a kill in the middle of a write leaves part of a line behind
    cut = int(len(data) * fraction)
    assert data[cut - 1:cut] != b"\n"
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(data[:cut])
    finished_lines = data[:cut].count(b"\n")
    rerun = run_shard(settings, seed_pool, resumed)
    assert resumed.read_bytes() == data
    # only the unfinished group and the ones after it were generated again
    finished_groups = finished_lines // 4
    assert rerun.prompts_generated == full_run.prompts_generated - finished_groups


def test_instruction_shard_resumes_after_a_crash_of_the_job(tmp_path, seed_pool):
    """As under Snakemake: the job dies, its declared output does not exist, the partial file does."""
    settings = instruction_settings()
    complete = tmp_path / "complete.jsonl"
    run_shard(settings, seed_pool, complete)

    class CrashingTeacher(ScriptedTeacher):
        def generate(self, prompts, sampling, n, seed):
            if self.prompts_generated >= 6:
                raise RuntimeError("killed")
            return super().generate(prompts, sampling, n, seed)

    out = tmp_path / "shard.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        run_shard(settings, seed_pool, out, teacher=CrashingTeacher())
    assert not out.exists() and len(read_jsonl(tmp_path / "shard.jsonl.partial")) == 24
    run_shard(settings, seed_pool, out)
    assert out.read_bytes() == complete.read_bytes()
    assert not (tmp_path / "shard.jsonl.partial").exists()


def test_finished_shard_reruns_without_the_teacher(tmp_path, seed_pool):
    out = tmp_path / "shard.jsonl"
    run_shard(instruction_settings(), seed_pool, out)
    before = out.read_bytes()

    def no_teacher():
        raise AssertionError("a finished shard must not load the teacher")

    synthesize_instructions(instruction_settings(), str(seed_pool), "unused", str(out), 0, generator_factory=no_teacher)
    assert out.read_bytes() == before


def test_instruction_shard_gives_up_with_a_clear_error(tmp_path, seed_pool):
    class SilentTeacher(ScriptedTeacher):
        def generate(self, prompts, sampling, n, seed):
            return [[""] * n for _ in prompts]

    out = tmp_path / "shard.jsonl"
    with pytest.raises(DataError, match="synthesis.max_prompts_factor"):
        run_shard(instruction_settings(max_prompts_factor=0.5), seed_pool, out, teacher=SilentTeacher())
    assert not out.exists()  # an unfinished shard never has the finished name
    partial = tmp_path / "shard.jsonl.partial"
    assert {r["reason"] for r in read_jsonl(partial)} == {"no_instruction"}  # the work done is kept


def test_bad_seed_pool_is_an_error(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"id": "seed-0", "text": "Name a fruit."}\n{"id": "seed-1"}\n')
    with pytest.raises(DataError, match="record 2"):
        run_shard(instruction_settings(), pool, tmp_path / "out.jsonl")


def test_merge_dedups_across_shards_and_cuts_whole_groups(tmp_path, seed_pool):
    settings = instruction_settings()
    shards = [tmp_path / f"shard-{i}.jsonl" for i in range(2)]
    for i, path in enumerate(shards):
        run_shard(settings, seed_pool, path, i)
    # plant a near copy of a shard-0 instruction in shard 1
    shard0_kept = [r for r in read_jsonl(shards[0]) if r["kept"]]
    shard1 = read_jsonl(shards[1])
    victim = next(r for r in shard1 if r["kept"])
    victim["instruction"] = shard0_kept[0]["instruction"] + " Now."
    write_jsonl_atomic(shards[1], shard1)

    out, summary = tmp_path / "instructions.jsonl", tmp_path / "summary.json"
    merge_instructions({"target": 24, "rouge_threshold": FILTERS["rouge_threshold"], "label": "r1-probes"}, [str(p) for p in shards], str(out),
                       str(summary))
    merged = read_jsonl(out)
    stats = json.loads(summary.read_text())
    assert 24 <= len(merged) < 24 + 4 and all(r["kept"] for r in merged)
    assert victim["id"] not in {r["id"] for r in merged}
    assert stats["cross_shard_removed"] >= 1 and stats["generated"] == sum(len(read_jsonl(p)) for p in shards)
    assert sum(stats["rejected"].values()) + sum(stats["kept_per_shard"].values()) == stats["generated"]
    # whole groups: every merged group has all its surviving kept siblings
    surviving = {}
    for path in shards:
        for r in read_jsonl(path):
            if r["kept"] and r["id"] != victim["id"]:
                surviving.setdefault(r["group"], set()).add(r["id"])
    merged_groups = {}
    for r in merged:
        merged_groups.setdefault(r["group"], set()).add(r["id"])
    assert all(ids == surviving[group] for group, ids in merged_groups.items())

    with pytest.raises(DataError, match="synthesis.oversample"):
        merge_instructions({"target": 500, "rouge_threshold": FILTERS["rouge_threshold"], "label": "x"}, [str(p) for p in shards],
                           str(tmp_path / "o.jsonl"), str(tmp_path / "s.json"))


def response_records(count: int) -> list[dict]:
    return [{"id": f"i{k:03d}", "group": f"g{k // 3:03d}", "instruction": f"Name {k} fruits.", "kept": True}
            for k in range(count)]


class EchoTeacher(ScriptedTeacher):
    def generate(self, prompts, sampling, n, seed):
        self.prompts_generated += len(prompts)
        return [[f"  answer to {prompt} with seed {prompt_seed}\n"]
                for prompt, prompt_seed in zip(prompts, prompt_seeds(seed, len(prompts)))]


def test_responses_resume_and_merge(tmp_path):
    instructions = tmp_path / "instructions.jsonl"
    write_jsonl_atomic(instructions, response_records(20))
    settings = {"label": "r1-probes", "shards": 2, "seed": 1, "batch_size": 4, "response_sampling": SAMPLING}
    paths = [tmp_path / f"responses.shard-{i}.jsonl" for i in range(2)]
    for shard, path in enumerate(paths):
        synthesize_responses(settings, str(instructions), "unused", str(path), shard, generator_factory=EchoTeacher)
    complete = paths[1].read_bytes()
    record = read_jsonl(paths[1])[0]
    assert record["response"] == record["response"].strip() and record["response_raw"].startswith("  answer")
    assert record["instruction"] == "Name 10 fruits." and record["group"] == "g003"

    paths[1].write_bytes(complete[: int(len(complete) * 0.6)])
    teacher = EchoTeacher()
    synthesize_responses(settings, str(instructions), "unused", str(paths[1]), 1, generator_factory=lambda: teacher)
    assert paths[1].read_bytes() == complete
    assert teacher.prompts_generated <= 8  # the finished batches were not generated again

    out = tmp_path / "responses.jsonl"
    merge_responses({}, [str(p) for p in paths], str(instructions), str(out))
    assert [r["id"] for r in read_jsonl(out)] == [f"i{k:03d}" for k in range(20)]

    paths[1].write_bytes(complete[: complete.index(b"\n") + 1])
    with pytest.raises(DataError, match="missing"):
        merge_responses({}, [str(p) for p in paths], str(instructions), str(out))
    with pytest.raises(DataError, match="twice"):
        merge_responses({}, [str(paths[0]), str(paths[0])], str(instructions), str(out))


def test_responses_do_not_depend_on_the_batch_size(tmp_path):
    instructions = tmp_path / "instructions.jsonl"
    write_jsonl_atomic(instructions, response_records(9))
    outputs = set()
    for batch_size in (1, 4, 16):
        out = tmp_path / f"responses-{batch_size}.jsonl"
        settings = {"label": "r1-probes", "shards": 1, "seed": 1, "batch_size": batch_size, "response_sampling": SAMPLING}
        synthesize_responses(settings, str(instructions), "unused", str(out), 0, generator_factory=EchoTeacher)
        outputs.add(out.read_bytes())
    assert len(outputs) == 1


def test_split_keeps_groups_whole_and_is_seeded(tmp_path):
    responses = tmp_path / "responses.jsonl"
    records = response_records(40)  # groups of 3, and one of 1
    write_jsonl_atomic(responses, records)
    settings = {"warmup_size": 12, "probing_size": 18, "seed": 3}
    outs = [tmp_path / "warmup.jsonl", tmp_path / "probing.jsonl"]
    split_probes(settings, str(responses), *map(str, outs))
    warmup, probing = read_jsonl(outs[0]), read_jsonl(outs[1])
    assert len(warmup) == 12 and len(probing) == 18
    warm_groups, probe_groups = {r["group"] for r in warmup}, {r["group"] for r in probing}
    assert not warm_groups & probe_groups
    sizes = {}
    for r in records:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    assert all(sum(r["group"] == g for r in warmup + probing) == sizes[g] for g in warm_groups | probe_groups)

    split_probes(settings, str(responses), str(tmp_path / "w2.jsonl"), str(tmp_path / "p2.jsonl"))
    assert (tmp_path / "p2.jsonl").read_bytes() == outs[1].read_bytes()
    split_probes({**settings, "seed": 4}, str(responses), str(tmp_path / "w3.jsonl"), str(tmp_path / "p3.jsonl"))
    assert (tmp_path / "p3.jsonl").read_bytes() != outs[1].read_bytes()

    # 13 cannot be made of groups of 3 exactly: the smallest group that completes it is added
    split_probes({**settings, "probing_size": 13, "warmup_size": 10}, str(responses), *map(str, outs))
    assert 13 <= len(read_jsonl(outs[1])) <= 15

    with pytest.raises(DataError, match="probes.warmup_size"):
        split_probes({**settings, "warmup_size": 30}, str(responses), *map(str, outs))


@pytest.mark.slow
def test_real_teacher_yields_instructions_and_answers(tmp_path, seed_pool, smol_dir):
    """The embedded 135M teacher through the real transformers backend: a handful of prompts, few tokens."""
    card = tmp_path / "teacher.json"
    write_model_card(card, smol_dir)
    settings = instruction_settings(target=2, shards=1, oversample=1.0, batch_size=2, n=2,
                                    instruction_sampling={**SAMPLING, "max_new_tokens": 24})
    out = tmp_path / "shard-0.jsonl"
    synthesize_instructions(settings, str(seed_pool), str(card), str(out), 0)
    records = read_jsonl(out)
    kept = [r for r in records if r["kept"]]
    assert len(kept) >= 2 and len(records) <= 12
    prompt = records[0]["prompt"]
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n<task>")

    instructions = tmp_path / "instructions.jsonl"
    write_jsonl_atomic(instructions, kept[:2])
    responses = tmp_path / "responses.jsonl"
    synthesize_responses({**settings, "response_sampling": {**SAMPLING, "temperature": 0.6, "max_new_tokens": 12}},
                         str(instructions), str(card), str(responses), 0)
    answered = read_jsonl(responses)
    assert [r["id"] for r in answered] == [r["id"] for r in kept[:2]]
    assert any(r["response"] for r in answered)


class RationaleTeacher(ScriptedTeacher):
    """Answers as the rationale style asks: a reason, then the instruction in <instruction> tags."""

    def generate(self, prompts, sampling, n, seed):
        self.prompts_generated += len(prompts)
        outputs = []
        for position, prompt in enumerate(prompts):
            texts = []
            for c in range(n):
                rng = random.Random(derive_seed(seed, prompt, position, c))
                words = " ".join(rng.sample(WORDS, 6))
                texts.append(f"This tests reasoning about {words}.\n<instruction>Explain why the {words} "
                             f"matter.</instruction>")
            outputs.append(texts)
        return outputs


def test_rationale_style_records_raw_outputs_and_dpo_trains_on_them(tmp_path, seed_pool):
    from montessori.pairs import pairs_for_group

    out = tmp_path / "shard-0.jsonl"
    run_shard(instruction_settings(prompt_style="rationale", target=4, shards=1), seed_pool, out,
              teacher=RationaleTeacher())
    records = read_jsonl(out)
    first = records[0]
    assert first["prompt"].endswith("</user><assistant>")        # nothing pre-filled
    assert "<instruction>" in first["prompt"] and "<task>" not in first["prompt"]
    assert first["raw_output"].startswith("This tests reasoning") and first["extraction"] == "tagged"
    assert first["instruction"].startswith("Explain why the ") and "<instruction>" not in first["instruction"]
    group = [dict(record, score=score) for record, score in zip(records[:4], (-1.0, 1.0, -0.5, 0.5))]
    pairs = pairs_for_group(first["group"], group, "sign")
    assert pairs and all(pair["prompt"] == first["prompt"] for pair in pairs)
    # DPO's prompt is the generation prompt, its completions the whole raw outputs, rationale included
    assert {pair["chosen"] for pair in pairs} == {records[0]["raw_output"], records[2]["raw_output"]}
    assert all(pair["rejected"].startswith("This tests reasoning") for pair in pairs)
