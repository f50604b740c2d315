"""The probe judge (pairs.signal judge): MT-Bench's single-answer prompt on each probe, ratings
cached, a probe without a rating written as null. The judge itself is replaced by a recorder: the
local and API rating judges have their own tests (tests/test_eval_mt_bench.py)."""

from __future__ import annotations

import pytest
from pipeline_helpers import ROOT

import montessori.evaluation.mt_bench as mt_bench
import montessori.probe_judge as probe_judge
from montessori.errors import ConfigError, DataError
from montessori.io import read_jsonl, write_jsonl_atomic

PROMPTS = str(ROOT / "data" / "eval" / "mt_bench" / "judge_prompts.jsonl")
SETTINGS = {"judge": {"type": "api", "model": "judge-model", "base_url": "http://localhost:1"},
            "mt_bench": {"judge_prompts": PROMPTS}}
PROBES = [{"id": f"g{g}-c{c}", "group": f"g{g}", "instruction": f"Instruction {g}.{c}", "response": f"Answer {g}.{c}"}
          for g in range(2) for c in range(2)]


class RecordingJudge:
    """Rates "Answer 1.1" as missing (-1, as a judge without "[[rating]]"), the others by position."""

    def __init__(self):
        self.asked = []

    def rate(self, conversations):
        results = []
        for system, user in conversations:
            self.asked.append((system, user))
            score = -1 if "Answer 1.1" in user else float(len(self.asked))
            results.append({"judgment": f"Rating: [[{score}]]", "score": score})
        return results


@pytest.fixture()
def judge(monkeypatch):
    recorder = RecordingJudge()
    monkeypatch.setattr(mt_bench, "make_rating_judge", lambda settings, card: (recorder, 1))
    return recorder


def run(tmp_path, records=PROBES, settings=SETTINGS):
    probing = tmp_path / "probing.jsonl"
    write_jsonl_atomic(probing, records)
    out = tmp_path / "scores.jsonl"
    probe_judge.judge_probes(settings, probing=str(probing), out=str(out), cache=str(tmp_path / "cache.jsonl"))
    return read_jsonl(out)


def test_each_probe_is_rated_with_the_single_answer_prompt(tmp_path, judge):
    scores = run(tmp_path)
    assert [s["id"] for s in scores] == [p["id"] for p in PROBES]
    assert [s["group"] for s in scores] == [p["group"] for p in PROBES]
    assert [s["judge_score"] for s in scores] == [1.0, 2.0, 3.0, None]   # no rating: null
    system, user = judge.asked[0]
    assert system == "You are a fair and careful evaluator of AI assistants."
    assert "Instruction 0.0" in user and "Answer 0.0" in user and "{question}" not in user


def test_a_rerun_asks_only_what_the_cache_lacks(tmp_path, judge):
    first = run(tmp_path)
    assert len(judge.asked) == 4
    more = [*PROBES, {"id": "g2-c0", "group": "g2", "instruction": "Instruction 2.0", "response": "Answer 2.0"}]
    second = run(tmp_path, more)
    assert len(judge.asked) == 5                    # only the new probe was judged
    assert second[:4] == first


def test_bad_input_names_file_or_key(tmp_path, judge):
    with pytest.raises(DataError, match=r"probing.jsonl: record 1 has no 'response'"):
        run(tmp_path, [{"id": "a", "group": "g", "instruction": "x"}])
    with pytest.raises(ConfigError, match="evaluation.mt_bench.judge_prompts"):
        run(tmp_path, settings={**SETTINGS, "mt_bench": {}})
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl_atomic(prompts, [{"name": "pair-v2", "system_prompt": "", "prompt_template": ""}])
    with pytest.raises(DataError, match=r"judge prompt 'single-v1' is missing"):
        run(tmp_path, settings={**SETTINGS, "mt_bench": {"judge_prompts": str(prompts)}})
