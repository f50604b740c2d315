"""The Self-Reward baseline (method self_reward, montessori/self_reward.py): candidates, the self
judge's prompt and expected score, best-against-worst pairs, config checks, the planned DAG and
one tiny run end to end."""

from __future__ import annotations

import json

import pytest
import yaml
from pipeline_helpers import (ROOT, TINY_RESULTS, job_stats, make_workdir, planned_jobs,
                              read_jsonl, run_snakemake)

import montessori.self_reward as self_reward
from montessori.config import load_config, validate_config
from montessori.errors import ConfigError, DataError
from montessori.io import write_jsonl_atomic
from montessori.pairs import build_pairs
from montessori.seeding import derive_seed

RESULTS = TINY_RESULTS


# ---- the judge prompt and its score ------------------------------------------------------------

def test_the_additive_prompt_is_the_papers_with_the_instruction_and_response_in_place():
    prompt = self_reward.judge_prompt("Name a prime.", "7 is prime.")
    assert prompt.startswith("Review the user's question and the corresponding response using the additive "
                             "5-point scoring system")
    assert "User: Name a prime.\n\n<response>7 is prime.</response>" in prompt
    assert 'Conclude with the score using the format: "Score: <total points>"' in prompt
    assert prompt.count("point") >= 5 and "{" not in prompt


def test_expected_points_weighs_each_score_and_renormalizes():
    assert self_reward.expected_points([0, 0, 0, 0, 0, 1]) == 5
    assert self_reward.expected_points([0.2, 0, 0, 0, 0, 0.2]) == pytest.approx(2.5)
    # mass outside the six scores (other tokens) does not drag the score down
    assert self_reward.expected_points([0, 0.01, 0, 0.03, 0, 0]) == pytest.approx(2.5)
    assert self_reward.expected_points([0.0] * 6) is None
    with pytest.raises(ValueError):
        self_reward.expected_points([0.5, 0.5])


class CharTokenizer:
    """One token per character, except that `space_merges` glues a space to the digit after it."""

    def __init__(self, space_merges: bool):
        self.space_merges = space_merges

    def encode(self, text, add_special_tokens=False):
        tokens, i = [], 0
        while i < len(text):
            if self.space_merges and text[i] == " " and i + 1 < len(text) and text[i + 1].isdigit():
                tokens.append(1000 + int(text[i + 1]))
                i += 2
            else:
                tokens.append(ord(text[i]))
                i += 1
        return tokens


def test_score_tokens_follow_the_prefill_each_tokenizer_writes_them_after():
    prefill, ids = self_reward.score_token_ids(CharTokenizer(space_merges=False), "m")
    assert prefill == "Score: " and ids == [ord(str(d)) for d in range(6)]
    # "Score: " then "3" would split a token the model writes as " 3": the prefill stops before the space
    prefill, ids = self_reward.score_token_ids(CharTokenizer(space_merges=True), "m")
    assert prefill == "Score:" and ids == [1000 + d for d in range(6)]


def test_score_tokens_of_the_embedded_tokenizer(smol_dir):
    from montessori.models import load_tokenizer

    tokenizer = load_tokenizer(smol_dir)
    prefill, ids = self_reward.score_token_ids(tokenizer, smol_dir)
    assert [tokenizer.decode([i]).strip() for i in ids] == [str(d) for d in range(6)]
    assert prefill in self_reward.SCORE_PREFILLS


def test_the_student_judges_its_candidates_with_the_additive_prompt(tmp_path, student):
    """The local judge on the tiny random model: a score in 0-5 for each candidate, from the
    distribution over the six score tokens; a rerun reads every score back from the cache."""
    candidates = tmp_path / "candidates.jsonl"
    write_jsonl_atomic(candidates, [{"id": f"i{g}-c{c}", "group": f"i{g}", "instruction": f"Question {g}?",
                                     "prompt": "p", "raw_output": f" answer {c}", "response": f"answer {c}"}
                                    for g in range(2) for c in range(2)])
    out, cache = tmp_path / "scores.jsonl", tmp_path / "cache.jsonl"
    self_reward.self_judge({"batch_size": 3}, str(candidates), str(student), str(out), str(cache))
    scores = read_jsonl(out)
    assert [s["id"] for s in scores] == ["i0-c0", "i0-c1", "i1-c0", "i1-c1"]
    assert all(0 <= s["judge_score"] <= 5 for s in scores)
    cached = read_jsonl(cache)
    assert all(sum(r["score_probabilities"]) > 0 for r in cached) and len(cached) == 4

    def no_judge(*args):
        raise AssertionError("a rerun must read the cache, not load the judge")

    self_reward.self_judge({"batch_size": 3}, str(candidates), str(student), str(out), str(cache),
                           judge_factory=no_judge)
    assert read_jsonl(out) == scores


# ---- candidates --------------------------------------------------------------------------------

class FakeGenerator:
    """Echoes each prompt's seed and the candidate index, so seeds and order are visible."""

    def __init__(self):
        self.calls = []

    def chat_prompt(self, text, prefill=""):
        return f"<user>{text}<assistant>"

    def generate(self, prompts, sampling, n, seeds):
        self.calls.append(len(prompts))
        return [[f" {seed}:{j} " for j in range(n)] for seed in seeds]


def test_candidates_are_n_per_instruction_with_their_prompt_and_a_seed_per_instruction(tmp_path):
    instructions = tmp_path / "instructions.jsonl"
    write_jsonl_atomic(instructions, [{"id": f"r1-i{i}", "instruction": f"Do {i}."} for i in range(3)])
    settings = {"n": 2, "sampling": {"temperature": 0.7}, "seed": 5, "label": "r1-self_reward", "batch_size": 2}
    out = tmp_path / "candidates.jsonl"
    self_reward.generate_candidates(settings, str(instructions), "unused", str(out), generator=FakeGenerator())
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["r1-i0-c0", "r1-i0-c1", "r1-i1-c0", "r1-i1-c1", "r1-i2-c0", "r1-i2-c1"]
    first = records[0]
    seed = derive_seed(5, "r1-self_reward", "candidates", "r1-i0")
    assert first == {"id": "r1-i0-c0", "group": "r1-i0", "instruction": "Do 0.", "prompt": "<user>Do 0.<assistant>",
                     "raw_output": f" {seed}:0 ", "response": f"{seed}:0"}
    # batch size is throughput only: one instruction at a time gives the same file
    again = tmp_path / "again.jsonl"
    self_reward.generate_candidates({**settings, "batch_size": 1}, str(instructions), "unused", str(again),
                                    generator=FakeGenerator())
    assert read_jsonl(again) == records
    # a finished file is resumed: nothing is generated again
    generator = FakeGenerator()
    self_reward.generate_candidates(settings, str(instructions), "unused", str(out), generator=generator)
    assert generator.calls == [] and read_jsonl(out) == records


def test_candidates_need_two_per_instruction_and_instructions(tmp_path):
    instructions = tmp_path / "instructions.jsonl"
    write_jsonl_atomic(instructions, [{"id": "a", "instruction": "Do."}])
    with pytest.raises(ConfigError, match="self_reward.n"):
        self_reward.generate_candidates({"n": 1, "sampling": {}}, str(instructions), "m", str(tmp_path / "o"),
                                        generator=FakeGenerator())
    write_jsonl_atomic(instructions, [{"id": "a"}])
    with pytest.raises(DataError, match="instruction"):
        self_reward.generate_candidates({"n": 2, "sampling": {"temperature": 1}}, str(instructions), "m",
                                        str(tmp_path / "o"), generator=FakeGenerator())


# ---- pairs: best against worst per instruction when the scores differ --------------------------

def test_pairs_are_the_best_against_the_worst_answer_when_scores_differ(tmp_path):
    candidates, scores = tmp_path / "candidates.jsonl", tmp_path / "scores.jsonl"
    table = {"a": [2.0, 4.5, 1.0, 3.0], "b": [3.0, 3.0, 3.0, 3.0], "c": [None, 2.0, 5.0, None]}
    write_jsonl_atomic(candidates, [{"id": f"{g}-c{j}", "group": g, "instruction": g, "prompt": f"<{g}>",
                                     "raw_output": f"{g}{j}", "response": f"{g}{j}"}
                                    for g, values in table.items() for j in range(len(values))])
    write_jsonl_atomic(scores, [{"id": f"{g}-c{j}", "group": g, "judge_score": v}
                                for g, values in table.items() for j, v in enumerate(values)])
    out, summary = tmp_path / "pairs.jsonl", tmp_path / "summary.json"
    build_pairs({"signal": "judge", "rule": "rank", "min_margin": 0.0}, str(scores), str(candidates), str(out),
                str(summary))
    pairs = read_jsonl(out)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("<a>", "a1", "a2"), ("<c>", "c2", "c1")]
    stats = json.loads(summary.read_text())
    assert stats["pairs"] == 2 and stats["candidates_without_score"] == 2 and stats["higher_is_better"]


# ---- config --------------------------------------------------------------------------------------

def base_config(**overrides) -> dict:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("section, key", [({"judge": "gpt4"}, "self_reward.judge"), ({"n": 1}, "self_reward.n"),
                                          ({"sampling": {"top_p": 0}}, "self_reward.sampling.top_p"),
                                          ({"dpo": {}}, "self_reward.dpo")])
def test_bad_self_reward_settings_name_their_key(section, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_config(base_config(self_reward=section))


def test_self_reward_is_no_reference_for_transfer_students():
    config = base_config(methods=["self_instruct", "self_reward"],
                         transfer_students=[{"name": "other", "model": "smollm2-135m-instruct"}])
    config["evaluation"] = {"alpaca_eval": {"reference": ["dataset", "method:self_reward"]}}
    with pytest.raises(ConfigError, match="'evaluation.alpaca_eval.reference'.*self_reward"):
        validate_config(config)
    config["evaluation"] = {"alpaca_eval": {"reference": ["dataset", "method:self_instruct"]}}
    validate_config(config)


def test_the_default_self_reward_settings_are_the_papers():
    config = validate_config(base_config())
    assert config["self_reward"] == {"n": 4, "judge": "external",
                                     "sampling": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0,
                                                  "presence_penalty": 0.0, "max_new_tokens": 64}}
    assert self_reward.check_judge("self") == "self"
    with pytest.raises(ConfigError, match="'self_reward.judge'"):
        self_reward.check_judge("other")


# ---- the planned DAG -----------------------------------------------------------------------------

def dry_run(tmp_path, extra: dict, *configfiles: str, printshellcmds: bool = False):
    workdir = make_workdir(tmp_path / "work")
    (workdir / "presets").symlink_to(ROOT / "presets")
    (workdir / "extra.yaml").write_text(yaml.safe_dump(extra))
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", *(["-p"] if printshellcmds else []),
                        "--configfile", *configfiles, "extra.yaml")
    assert dry.returncode == 0, dry.stdout[-4000:]
    return dry.stdout


def test_two_rounds_with_three_methods_plan_self_reward_beside_the_others(tmp_path):
    out = dry_run(tmp_path, {"rounds": 2, "methods": ["montessori", "self_instruct", "self_reward"]},
                  "config.yaml", printshellcmds=True)
    stats = job_stats(out)
    for rule in ("self_reward_candidates", "self_reward_judge", "self_reward_pairs", "dpo_self_reward_student"):
        assert stats[rule] == 2, (rule, stats)
    assert stats["sft_student"] == 4                  # montessori and self_instruct, two rounds
    assert stats["dpo_teacher"] == 2
    jobs = planned_jobs(out)
    # the teacher writes self_reward's instructions (untrained, as for self_instruct) but never answers them
    sets = {job.wildcards.get("set") for job in jobs if job.rule == "synth_responses"}
    assert "self_reward/train" not in sets
    assert {job.wildcards["set"] for job in jobs if job.rule == "merge_instructions"} >= {"self_reward/train"}
    # iteration 2 starts from iteration 1's student; the external judge is the evaluation's judge
    for k, student in (("1", "models/student.json"), ("2", "round1/self_reward/student.done")):
        blocks = [block for block in out.split("\nrule ")
                  if block.startswith(("self_reward_candidates:", "dpo_self_reward_student:"))
                  and f"wildcards: k={k}\n" in block]
        assert len(blocks) == 2 and all(f"results/default/{student}" in b for b in blocks)
    judges = [block for block in out.split("\nrule ") if block.startswith("self_reward_judge:")]
    assert all("judge_probes" in b and "models/judge.json" in b for b in judges)
    # every self_reward student is evaluated and reported
    report = next(block for block in out.split("\nrule ") if block.startswith("report:"))
    for k in (1, 2):
        assert f"eval/self_reward-round{k}/mt_bench/scores.json" in report


def test_the_self_judge_is_the_student_being_trained(tmp_path):
    out = dry_run(tmp_path, {"rounds": 2, "methods": ["self_reward"], "self_reward": {"judge": "self"},
                             "evaluation": {"alpaca_eval": {"reference": "dataset"}}}, "config.yaml",
                  printshellcmds=True)
    judges = {block.split("wildcards: k=")[1][0]: block for block in out.split("\nrule ")
              if block.startswith("self_reward_judge:")}
    assert "--student results/default/models/student.json" in judges["1"]
    assert "--student results/default/round1/self_reward/student.done" in judges["2"]
    assert all("self_reward_judge --settings" in b for b in judges.values())


def test_the_8b_preset_plans_self_reward_on_its_gpus(tmp_path):
    out = dry_run(tmp_path, {"methods": ["montessori", "self_instruct", "self_reward"]}, "presets/llama3-8b.yaml")
    config = load_config(ROOT / "config.yaml", ROOT / "presets" / "llama3-8b.yaml")
    jobs = planned_jobs(out)
    rounds = config["rounds"]
    stats = job_stats(out)
    for rule in ("self_reward_candidates", "self_reward_judge", "self_reward_pairs", "dpo_self_reward_student"):
        assert stats[rule] == rounds
    dpo = [job for job in jobs if job.rule == "dpo_self_reward_student"]
    dpo_gpus = config["dpo"]["gpus"] or config["compute"]["training_gpus"]
    assert {job.resources.get("gpu") for job in dpo} == {str(dpo_gpus)}
    candidates = [job for job in jobs if job.rule == "self_reward_candidates"]
    assert {job.resources.get("gpu") for job in candidates} == {str(config["compute"]["gpus"])}
    assert {f"self_reward-round{k}" for k in range(1, rounds + 1)} <= {
        job.wildcards.get("student") for job in jobs if job.rule == "eval_generate"}
