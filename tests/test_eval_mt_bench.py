"""MT-Bench stages: FastChat file formats, judge prompts with reference answers, [[rating]] parsing."""

import json
from pathlib import Path

import pandas as pd
import pytest

from montessori import openai_client
from montessori.evaluation import mt_bench
from montessori.evaluation.judges import (LocalRatingJudge, expected_rating, parse_rating,
                                          rating_distribution)
from montessori.evaluation.mt_bench import generate_answers, judge_answers
from montessori.models import write_model_card

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PREFILL = "Rating: [["
MT = ROOT / "data" / "eval" / "mt_bench"


@pytest.mark.parametrize("text, rating", [
    ("The answer is helpful. Rating: [[7]]", 7),
    ("Rating: [[8.5]]", 8.5),
    ("[[ 6 ]]", 6),
    ("First [[3]] then [[9]]", 3),
    ("Rating: [7]", -1),          # single brackets: not the required form
    ("Rating: [[11]]", -1),       # outside 1-10
    ("Rating: [[0]]", -1),
    ("I would give it a seven.", -1),
    ("[[seven]]", -1),
    ("", -1),
    (None, -1),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_shared_judge_prompts_format_like_fastchat(shared_data):
    """Our prompt filling works on FastChat's own judge_prompts.jsonl and reference answers."""
    templates = {json.loads(line)["name"]: json.loads(line)
                 for line in (shared_data / "mt_bench" / "judge_prompts.jsonl").read_text().splitlines()}
    question = json.loads((shared_data / "mt_bench" / "question.jsonl").read_text().splitlines()[-1])
    reference = json.loads((shared_data / "mt_bench" / "reference_answer" / "gpt-4.jsonl").read_text().splitlines()[0])
    answer = ["first answer", "second answer"]
    ref_turns = reference["choices"][0]["turns"]
    turn2 = mt_bench.judge_user_prompt(templates["single-math-v1-multi-turn"], question, answer, ref_turns, 2)
    assert question["turns"][1] in turn2 and "second answer" in turn2 and ref_turns[1] in turn2
    turn1 = mt_bench.judge_user_prompt(templates["single-v1"], question, answer, None, 1)
    assert question["turns"][0] in turn1 and "first answer" in turn1 and "second answer" not in turn1


def test_generate_answers_in_fastchat_format(tmp_path, tiny_model_dir):
    card = tmp_path / "student.json"
    write_model_card(card, tiny_model_dir)
    out = tmp_path / "answers.jsonl"
    settings = {"seed": 1, "backend": "transformers", "batch_size": 4,
                "mt_bench": {"questions": str(MT / "question.jsonl"), "limit": 3, "max_new_tokens": 3}}
    generate_answers(settings, str(card), str(out), "montessori-round1")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    questions = [json.loads(line) for line in (MT / "question.jsonl").read_text().splitlines()][:3]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
    for record in records:
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["model_id"] == "montessori-round1" and isinstance(record["answer_id"], str)
        assert record["choices"][0]["index"] == 0
        turns = record["choices"][0]["turns"]
        assert len(turns) == 2 and all(isinstance(t, str) for t in turns)


def _answers(path, model="base"):
    questions = [json.loads(line) for line in (MT / "question.jsonl").read_text().splitlines()]
    with path.open("w") as handle:
        for q in questions:
            handle.write(json.dumps({"question_id": q["question_id"], "answer_id": "a", "model_id": model,
                                     "choices": [{"index": 0, "turns": [f"A1 {q['question_id']}", "A2"]}],
                                     "tstamp": 0.0}) + "\n")
    return questions


def _settings():
    return {"seed": 1, "judge": {"type": "api", "model": "gpt-4", "base_url": "http://localhost:1"},
            "mt_bench": {"questions": str(MT / "question.jsonl"),
                         "reference_answers": str(MT / "reference_answer.jsonl"),
                         "judge_prompts": str(MT / "judge_prompts.jsonl")}}


def test_judge_answers_fastchat_judgments_and_missing_ratings(tmp_path, monkeypatch):
    questions = _answers(tmp_path / "answers.jsonl")
    seen = []

    def fake_endpoint(base_url, model, messages, **options):
        seen.append((messages[0]["content"], messages[1]["content"]))
        # every third judgement without a rating in the required form
        text = "Fine. Rating: [[8]]" if (len(seen) - 1) % 3 else "Rating: 8/10"
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}

    monkeypatch.setattr(openai_client, "chat_completion", fake_endpoint)
    out, scores, cache = tmp_path / "judgment.jsonl", tmp_path / "scores.json", tmp_path / "cache.jsonl"
    judge_answers(_settings(), str(tmp_path / "answers.jsonl"), str(out), str(scores), str(cache))

    assert len(seen) == 2 * len(questions)
    reference = {json.loads(line)["question_id"]: json.loads(line)
                 for line in (MT / "reference_answer.jsonl").read_text().splitlines()}
    judgments = [json.loads(line) for line in out.read_text().splitlines()]
    categories = {q["question_id"]: q["category"] for q in questions}
    for judgment, (system, user) in zip(judgments, seen):
        assert set(judgment) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
        needs_ref = categories[judgment["question_id"]] in ("math", "reasoning", "coding")
        expected = {(False, 1): "single-v1", (True, 1): "single-math-v1", (False, 2): "single-v1-multi-turn",
                    (True, 2): "single-math-v1-multi-turn"}[(needs_ref, judgment["turn"])]
        assert judgment["judge"] == ["gpt-4", expected] and judgment["user_prompt"] == user
        if needs_ref:
            assert reference[judgment["question_id"]]["choices"][0]["turns"][0] in user
    n_missing = sum(j["score"] == -1 for j in judgments)
    assert n_missing == len(judgments) // 3 + (len(judgments) % 3 > 0)

    # show_result.py --mode single reads the file this way
    df = pd.read_json(out, lines=True)[["model", "score", "turn"]]
    df = df[df["score"] != -1]
    first_turn = df[df["turn"] == 1].groupby(["model", "turn"]).mean()
    assert first_turn.loc[("base", 1), "score"] == 8
    summary = json.loads(scores.read_text())
    assert summary["overall"] == 8 and summary["turn_1"] == 8 and summary["turn_2"] == 8
    assert summary["n_missing"] == n_missing == summary["n_missing_turn_1"] + summary["n_missing_turn_2"]
    assert summary["n_judgments"] == 2 * len(questions) and summary["model"] == "base"

    # the cache answers a rerun
    monkeypatch.setattr(openai_client, "chat_completion", lambda *a, **k: pytest.fail("judge asked again"))
    judge_answers(_settings(), str(tmp_path / "answers.jsonl"), str(out), str(scores), str(cache))
    assert [j["judgment"] for j in (json.loads(line) for line in out.read_text().splitlines())] == \
        [j["judgment"] for j in judgments]


def test_rating_distribution_and_expectation_by_hand():
    digits = [0.5, 0, 0, 0, 0.5, 0, 0, 0, 0]  # "1" and "5"
    # "1" then "0" with probability .4 is a 10: P(1) = .3, P(5) = .5, P(10) = .2
    distribution = rating_distribution(digits, p_zero_after_one=0.4)
    assert distribution == pytest.approx([0.3, 0, 0, 0, 0.5, 0, 0, 0, 0, 0.2])
    assert expected_rating(distribution) == pytest.approx(0.3 + 2.5 + 2.0)
    # mass outside the ratings is renormalized away; "10" as one token counts as 10
    distribution = rating_distribution([0, 0, 0.1, 0, 0, 0, 0, 0, 0], p_ten_token=0.1)
    assert expected_rating(distribution) == pytest.approx(6.5)
    assert rating_distribution([0] * 9) == [] and expected_rating([]) == -1


def test_local_judge_scores_the_expected_rating_not_the_most_likely(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    judge = LocalRatingJudge(tiny_model_dir, batch_size=2)
    vocab = judge.model.config.vocab_size

    def known(prompts):
        # the most likely rating is 5 (.4), but 9 holds .35 and "1"+"0" (= 10) the rest
        probs = torch.zeros(len(prompts), vocab)
        if prompts[0].endswith(LOCAL_PREFILL):
            probs[:, judge.digit_ids[4]], probs[:, judge.digit_ids[8]], probs[:, judge.digit_ids[0]] = 0.4, 0.35, 0.25
        else:  # after "1": "0" for sure
            probs[:, judge.zero_id] = 1.0
        return probs

    monkeypatch.setattr(judge, "_next_token_probs", known)
    results = judge.rate([("sys", "a"), ("sys", "b"), ("sys", "c")])
    assert len(results) == 3
    for result in results:
        assert result["score"] == pytest.approx(0.4 * 5 + 0.35 * 9 + 0.25 * 10)
        assert result["rating_probabilities"] == pytest.approx([0, 0, 0, 0, 0.4, 0, 0, 0, 0.35, 0.25])
        assert parse_rating(result["judgment"]) == pytest.approx(result["score"], abs=1e-3)


def test_judge_answers_local_judge_expected_ratings(tmp_path, tiny_model_dir):
    _answers(tmp_path / "answers.jsonl")
    judge_card = tmp_path / "judge.json"
    write_model_card(judge_card, tiny_model_dir)
    settings = _settings()
    settings.update(batch_size=16)
    settings["judge"] = {"type": "local", "model": "tiny"}
    out, scores = tmp_path / "judgment.jsonl", tmp_path / "scores.json"
    judge_answers(settings, str(tmp_path / "answers.jsonl"), str(out), str(scores), str(tmp_path / "c.jsonl"),
                  judge=str(judge_card))
    judgments = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(scores.read_text())
    assert summary["n_judgments"] == len(judgments) == 16 and summary["n_missing"] == 0
    for judgment in judgments:
        assert sum(judgment["rating_probabilities"]) == pytest.approx(1.0)
        assert judgment["score"] == pytest.approx(expected_rating(judgment["rating_probabilities"]))
        assert 1 <= judgment["score"] <= 10
    # different answers, different scores: the judge is not stuck on one rating
    assert len({round(j["score"], 6) for j in judgments}) > 1


def test_judge_answers_requires_reference_for_math(tmp_path):
    from montessori.errors import DataError

    _answers(tmp_path / "answers.jsonl")
    (tmp_path / "refs.jsonl").write_text("")
    settings = _settings()
    settings["mt_bench"]["reference_answers"] = str(tmp_path / "refs.jsonl")
    with pytest.raises(DataError, match="no reference answer"):
        judge_answers(settings, str(tmp_path / "answers.jsonl"), str(tmp_path / "j.jsonl"), str(tmp_path / "s.json"),
                      str(tmp_path / "c.jsonl"))
