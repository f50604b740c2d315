"""AlpacaEval stages: outputs in alpaca_eval's format, weighted judging, cache, judge-answer parsing."""

import json
import math
from pathlib import Path

import pytest

from montessori.evaluation import alpaca_eval, judges
from montessori.evaluation.alpaca_eval import generate_outputs, judge_outputs
from montessori.models import write_model_card

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "data" / "eval" / "alpaca_eval.json"


def test_top_logprobs_give_the_weighted_preference():
    response = {"choices": [{"logprobs": {"content": [{"token": "M", "logprob": math.log(0.6), "top_logprobs": [
        {"token": "M", "logprob": math.log(0.6)}, {"token": "m", "logprob": math.log(0.2)},
        {"token": "The", "logprob": math.log(0.1)}]}]}}]}
    p_first, raw = judges.parse_top_logprobs(response)
    assert p_first == pytest.approx(0.25)  # .2 / (.2 + .6)
    assert judges.preference_from_probability(p_first, switched=False) == pytest.approx(1.75)
    # shown the other way round, the first shown output is the model: preference 1 + .25
    assert judges.preference_from_probability(p_first, switched=True) == pytest.approx(1.25)
    assert raw["top_logprobs"][0]["token"] == "M"


def test_top_logprobs_with_one_label_or_none():
    only_second = {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "M", "logprob": -0.1}]}]}}]}
    assert judges.parse_top_logprobs(only_second)[0] == 0.0
    neither = {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "Both", "logprob": -0.1}]}]}}]}
    assert math.isnan(judges.parse_top_logprobs(neither)[0])
    malformed = {"choices": [{"message": {"content": "m"}}]}
    assert math.isnan(judges.parse_top_logprobs(malformed)[0])


def test_generate_outputs_in_alpaca_eval_format(tmp_path, tiny_model_dir):
    card = tmp_path / "student.json"
    write_model_card(card, tiny_model_dir)
    out = tmp_path / "outputs.json"
    settings = {"seed": 3, "backend": "transformers", "batch_size": 2,
                "alpaca_eval": {"source": str(EVAL_SET), "limit": 3, "max_new_tokens": 4}}
    generate_outputs(settings, str(card), str(out), "base")
    rows = json.loads(out.read_text())
    source = json.loads(EVAL_SET.read_text())[:3]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in source]
    assert all(set(r) == {"dataset", "instruction", "output", "generator"} for r in rows)
    assert all(r["generator"] == "base" and isinstance(r["output"], str) for r in rows)


def _outputs(path, n, generator="student"):
    source = json.loads(EVAL_SET.read_text())[:n]
    rows = [{"dataset": r["dataset"], "instruction": r["instruction"], "output": f"answer {i}: " + "x" * (5 * i),
             "generator": generator} for i, r in enumerate(source)]
    path.write_text(json.dumps(rows))


def test_judge_outputs_local_judge_and_cache(tmp_path, tiny_model_dir, monkeypatch):
    judge_card = tmp_path / "judge.json"
    write_model_card(judge_card, tiny_model_dir)
    outputs = tmp_path / "outputs.json"
    _outputs(outputs, 6)
    paths = {"annotations": tmp_path / "annotations.json", "metrics": tmp_path / "metrics.json",
             "cache": tmp_path / "cache.jsonl"}
    settings = {"seed": 42, "judge": {"type": "local", "model": "tiny"}}
    judge_outputs(settings, str(outputs), str(EVAL_SET), judge=str(judge_card), **{k: str(v) for k, v in paths.items()})

    annotations = json.loads(paths["annotations"].read_text())
    assert len(annotations) == 6
    source = json.loads(EVAL_SET.read_text())[:6]
    assert [(r["output_1"], r["generator_1"]) for r in annotations] == [(r["output"], r["generator"]) for r in source]
    for row in annotations:
        assert {"instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference"} <= set(row)
        assert row["generator_2"] == "student"
        assert 1 <= row["preference"] <= 2
        raw = row["raw_completion"]
        p_first = judges.probability_first(raw["logprob_m"], raw["logprob_M"])
        assert row["preference"] == pytest.approx(judges.preference_from_probability(p_first, row["is_switched_outputs"]))
    # the order shown to the judge is randomized
    assert len({row["is_switched_outputs"] for row in annotations}) == 2
    metrics = json.loads(paths["metrics"].read_text())
    expected_win_rate = sum(r["preference"] - 1 for r in annotations) / 6 * 100
    assert metrics["win_rate"] == pytest.approx(expected_win_rate)
    for key in ("standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "discrete_win_rate",
                "length_controlled_winrate", "n_missing"):
        assert key in metrics
    assert metrics["generator"] == "student" and metrics["n_total"] == 6

    # A rerun pays nothing: every comparison comes from the cache.
    def no_judge(*args, **kwargs):
        raise AssertionError("the judge was asked again")

    monkeypatch.setattr(alpaca_eval, "make_preference_judge", no_judge)
    paths["annotations"].unlink()
    judge_outputs(settings, str(outputs), str(EVAL_SET), judge=str(judge_card), **{k: str(v) for k, v in paths.items()})
    assert json.loads(paths["annotations"].read_text()) == annotations
    assert len(paths["cache"].read_text().splitlines()) == 6


def test_missing_judgements_are_counted_not_guessed(tmp_path, monkeypatch):
    outputs, reference = tmp_path / "outputs.json", tmp_path / "reference.json"
    _outputs(outputs, 4)
    _outputs(reference, 4, generator="self_instruct-round1")

    class HalfSilentJudge:
        calls = 0

        def judge(self, instruction, first, second):
            HalfSilentJudge.calls += 1
            return (math.nan if HalfSilentJudge.calls % 2 else 0.0), {"top_logprobs": []}

    monkeypatch.setattr(alpaca_eval, "make_preference_judge", lambda *a: HalfSilentJudge())
    settings = {"seed": 1, "judge": {"type": "api", "model": "gpt-4-turbo", "base_url": "http://localhost:1"}}
    judge_outputs(settings, str(outputs), str(reference), str(tmp_path / "a.json"), str(tmp_path / "m.json"),
                  str(tmp_path / "c.jsonl"))
    annotations = json.loads((tmp_path / "a.json").read_text())
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert sum(row["preference"] is None for row in annotations) == 2
    assert metrics["n_missing"] == 2 and metrics["n_total"] == 2
    assert metrics["reference_generator"] == "self_instruct-round1"


def test_judge_outputs_needs_a_reference_for_every_instruction(tmp_path):
    from montessori.errors import DataError

    outputs, reference = tmp_path / "outputs.json", tmp_path / "reference.json"
    _outputs(outputs, 3)
    _outputs(reference, 2)
    with pytest.raises(DataError, match="no reference output"):
        judge_outputs({"judge": {"type": "local"}}, str(outputs), str(reference), str(tmp_path / "a.json"),
                      str(tmp_path / "m.json"), str(tmp_path / "c.jsonl"))


def test_reads_the_public_alpaca_eval_set(shared_data):
    rows = alpaca_eval.read_alpaca_rows(shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json")
    assert len(rows) == 805 and {r["generator"] for r in rows} == {"gpt4_1106_preview"}


def test_malformed_rows_are_named(tmp_path):
    from montessori.errors import DataError

    path = tmp_path / "outputs.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match=r"outputs.json row 2: lacks string field\(s\) \['output'\]"):
        alpaca_eval.read_alpaca_rows(path)


def test_paper_reference_instructions_are_not_evaluated(tmp_path, shared_data):
    from montessori.data import build_reference_set

    source = shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
    reference = tmp_path / "reference.jsonl"
    build_reference_set({"kind": "paper", "source": str(source), "allow_eval_contamination": True}, str(reference))
    rows = alpaca_eval.read_alpaca_rows(source, need_output=False)
    selected, record = alpaca_eval.select_rows(rows, None, str(reference))
    held_out = {json.loads(line)["instruction"] for line in reference.read_text().splitlines()}
    assert record == {"in_source": 805, "excluded_as_reference": 256, "evaluated": 549,
                      "reason": record["reason"]} and "influence reference set" in record["reason"]
    assert not {row["instruction"].strip() for row in selected} & held_out
    assert [row["instruction"] for row in selected] == [row["instruction"] for row in rows[256:]]
    limited, record = alpaca_eval.select_rows(rows, 10, str(reference))
    assert limited == selected[:10] and record["evaluated"] == 10   # the limit counts remaining rows
    everything, record = alpaca_eval.select_rows(rows, None, None)
    assert len(everything) == 805 and record["excluded_as_reference"] == 0 and "reason" not in record


def test_generate_outputs_leaves_out_the_reference_and_records_it(tmp_path, tiny_model_dir):
    card = tmp_path / "student.json"
    write_model_card(card, tiny_model_dir)
    source = json.loads(EVAL_SET.read_text())
    reference = tmp_path / "reference.jsonl"
    reference.write_text(json.dumps({"id": "r", "instruction": source[0]["instruction"], "response": "x"}) + "\n")
    out, selection = tmp_path / "outputs.json", tmp_path / "selection.json"
    settings = {"seed": 3, "backend": "transformers", "batch_size": 2,
                "alpaca_eval": {"source": str(EVAL_SET), "limit": 2, "max_new_tokens": 2}}
    generate_outputs(settings, str(card), str(out), "base", selection=str(selection), exclude=str(reference))
    assert [r["instruction"] for r in json.loads(out.read_text())] == [r["instruction"] for r in source[1:3]]
    assert json.loads(selection.read_text())["excluded_as_reference"] == 1
