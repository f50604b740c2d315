"""The analysis figures' numbers, on small hand-made files in the formats the pipeline writes."""

from __future__ import annotations

import json

import pytest

from montessori.errors import DataError
from montessori.figures import (
    INFLUENCE_SCORES,
    REWARD_KEYS,
    draw_analysis_figures,
    dpo_reward_curves,
    helpful_shares,
    influence_by_round,
    length_summary,
    lengths_by_set,
    round_of,
    set_label,
    wilson_interval,
)
from montessori.io import read_json, write_json_atomic, write_jsonl_atomic

PNG = b"\x89PNG\r\n\x1a\n"

# round -> (influence, influence_vs_momentum) per probe; 0.0 is not helpful (the pairs' sign rule)
INFLUENCE = {
    1: [(-0.2, -1.0), (-0.1, -1.0), (0.3, -1.0), (0.0, 1.0)],
    2: [(-0.5, 0.2), (-0.4, 0.1), (-0.3, -0.1), (-0.2, 0.4), (-0.1, 0.3)],
}


def write_influence(results):
    paths = []
    for k, scores in INFLUENCE.items():
        path = results / f"round{k}" / "influence" / "influence.jsonl"
        write_jsonl_atomic(path, [
            {"id": f"r{k}-p{i}", "group": f"r{k}-g{i}", "loss_before": 2.0, "loss_after": 2.0 + influence,
             "influence": influence, "influence_vs_momentum": versus, "seconds": 0.1}
            for i, (influence, versus) in enumerate(scores)])
        paths.append(str(path))
    return paths


def write_sets(results):
    """Round 1's probes and two training sets; word counts chosen by hand."""
    sets = {
        "round1/probes/responses.jsonl": [("Name a colour.", "Blue."), ("List three prime numbers please.", "2, 3, 5")],
        "round1/montessori/train/responses.jsonl": [("Explain rain.", "Water falls from clouds when droplets grow."),
                                                    ("Why?", "Because."), ("Define a word.", "A unit of language.")],
        "round1/self_instruct/train/responses.jsonl": [("Say hi.", "Hi")],
    }
    paths = []
    for relative, pairs in sets.items():
        path = results / relative
        write_jsonl_atomic(path, [{"id": f"x{i}", "instruction": instruction, "response": response}
                                  for i, (instruction, response) in enumerate(pairs)])
        paths.append(str(path))
    return paths


def write_teacher_losses(results, rounds=(1, 2)):
    paths = []
    for k in rounds:
        history = [{"step": step, "epoch": step / 3, "loss": 0.69 - 0.1 * step, "learning_rate": 1e-6,
                    "rewards/margins": 0.1 * step * k, "rewards/accuracies": step / 3,
                    "rewards/chosen": 0.05 * step, "rewards/rejected": -0.05 * step}
                   for step in (1, 2, 3)]
        path = results / f"round{k}" / "teacher_loss.json"
        write_json_atomic(path, {"stage": "dpo", "steps": 3, "history": history})
        paths.append(str(path))
    return paths


def test_files_are_placed_by_their_round_and_set(tmp_path):
    assert round_of("results/demo/round12/influence/influence.jsonl") == 12
    assert set_label("results/demo/round2/probes/responses.jsonl") == "probes"
    assert set_label("results/demo/round2/self_instruct/train/responses.jsonl") == "self_instruct"
    with pytest.raises(DataError, match="round<k>"):
        round_of("results/demo/influence.jsonl")
    with pytest.raises(DataError, match="round<k>"):
        set_label("results/demo/round2/responses.jsonl")


def test_wilson_interval_matches_published_values():
    # Wilson 95% intervals as tabulated by Newcombe (1998), Statistics in Medicine 17:857
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_helpful_share_per_round_counts_negative_influence_only(tmp_path):
    scores = influence_by_round(write_influence(tmp_path / "results"))
    assert list(scores) == [1, 2]
    assert scores[1]["influence"] == [-0.2, -0.1, 0.3, 0.0]
    rows = {(row["round"], row["score"]): row for row in helpful_shares(scores)}
    assert set(rows) == {(k, key) for k in (1, 2) for key in INFLUENCE_SCORES}
    assert (rows[1, "influence"]["helpful"], rows[1, "influence"]["n"], rows[1, "influence"]["share"]) == (2, 4, 0.5)
    assert rows[1, "influence_vs_momentum"]["share"] == 0.75
    assert rows[2, "influence"]["share"] == 1.0
    assert rows[2, "influence_vs_momentum"]["helpful"] == 1
    for row in rows.values():
        assert (row["low"], row["high"]) == wilson_interval(row["helpful"], row["n"])
        assert row["low"] <= row["share"] <= row["high"]
    # all five helpful: the interval is not the empty [1, 1] of the normal approximation
    assert rows[2, "influence"]["low"] == pytest.approx(0.5655, abs=1e-4)


def test_influence_records_must_carry_both_scores(tmp_path):
    path = tmp_path / "round1" / "influence" / "influence.jsonl"
    write_jsonl_atomic(path, [{"id": "a", "influence": -0.1, "influence_vs_momentum": 0.1},
                              {"id": "b", "influence": "n/a", "influence_vs_momentum": 0.1}])
    with pytest.raises(DataError, match=r"influence.jsonl:2: 'influence' is not a finite number"):
        influence_by_round([str(path)])


def test_lengths_are_words_per_set_and_round(tmp_path):
    lengths = lengths_by_set(write_sets(tmp_path / "results"))
    # the probes first, then the methods by name
    assert list(lengths) == [("probes", 1), ("montessori", 1), ("self_instruct", 1)]
    assert lengths["probes", 1] == {"instruction": [3, 5], "response": [1, 3]}
    assert lengths["montessori", 1] == {"instruction": [2, 1, 3], "response": [7, 1, 4]}
    summary = {(row["set"], row["field"]): row for row in length_summary(lengths)}
    assert summary["montessori", "response"] == {
        "set": "montessori", "round": 1, "field": "response", "n": 3, "mean": 4.0, "q1": 2.5, "median": 4, "q3": 5.5}
    assert summary["probes", "instruction"]["median"] == 4.0
    assert summary["self_instruct", "response"]["q1"] == 1


def test_a_set_record_without_a_response_is_an_error(tmp_path):
    path = tmp_path / "round1" / "probes" / "responses.jsonl"
    write_jsonl_atomic(path, [{"id": "a", "instruction": "Do it."}])
    with pytest.raises(DataError, match=r"responses.jsonl:1: no string 'response'"):
        lengths_by_set([str(path)])


def test_dpo_reward_curves_per_round(tmp_path):
    curves = dpo_reward_curves(write_teacher_losses(tmp_path / "results"))
    assert list(curves) == [1, 2]
    assert curves[2]["step"] == [1, 2, 3]
    assert curves[2]["rewards/margins"] == pytest.approx([0.2, 0.4, 0.6])
    assert curves[1]["rewards/accuracies"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert set(curves[1]) == {"step", *REWARD_KEYS}


def test_a_loss_record_without_rewards_is_not_taken_for_dpo(tmp_path):
    path = tmp_path / "round1" / "teacher_loss.json"
    write_json_atomic(path, {"stage": "sft", "history": [{"step": 1, "loss": 2.0}]})
    with pytest.raises(DataError, match="history entry 0 has no rewards/margins"):
        dpo_reward_curves([str(path)])


def test_the_stage_draws_every_figure_and_records_its_numbers(tmp_path):
    results = tmp_path / "results"
    out = tmp_path / "analysis"
    draw_analysis_figures({}, set_paths=write_sets(results), lengths_png=str(out / "lengths.png"),
                          numbers=str(out / "numbers.json"), influence_paths=write_influence(results),
                          teacher_loss_paths=write_teacher_losses(results),
                          influence_png=str(out / "influence.png"), helpful_share_png=str(out / "helpful.png"),
                          dpo_rewards_png=str(out / "rewards.png"))
    for name in ("lengths.png", "influence.png", "helpful.png", "rewards.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    numbers = read_json(out / "numbers.json")
    shares = {(row["round"], row["score"]): row["share"] for row in numbers["helpful_share"]}
    assert shares == {(1, "influence"): 0.5, (1, "influence_vs_momentum"): 0.75,
                      (2, "influence"): 1.0, (2, "influence_vs_momentum"): 0.2}
    assert numbers["dpo_rewards_last_step"]["2"]["rewards/margins"] == pytest.approx(0.6)
    assert len(numbers["lengths_words"]) == 3 * 2
    assert not list(out.glob("*.tmp")), "figures are written by rename"


def test_without_the_montessori_method_only_lengths_are_drawn(tmp_path):
    results = tmp_path / "results"
    out = tmp_path / "analysis"
    trained = [p for p in write_sets(results) if "/probes/" not in p]
    draw_analysis_figures({}, set_paths=trained, lengths_png=str(out / "lengths.png"), numbers=str(out / "n.json"))
    assert sorted(p.name for p in out.iterdir()) == ["lengths.png", "n.json"]
    assert set(json.loads((out / "n.json").read_text())) == {"lengths_words"}
    with pytest.raises(DataError, match="together"):
        draw_analysis_figures({}, set_paths=trained, lengths_png=str(out / "lengths.png"),
                              numbers=str(out / "n.json"), influence_paths=write_influence(results))


def test_with_the_judge_signal_the_dpo_rewards_are_drawn_without_influence(tmp_path):
    """pairs.signal judge: the teacher learns (DPO rewards) but no influence is scored."""
    results = tmp_path / "results"
    out = tmp_path / "analysis"
    draw_analysis_figures({}, set_paths=write_sets(results), lengths_png=str(out / "lengths.png"),
                          numbers=str(out / "n.json"), teacher_loss_paths=write_teacher_losses(results),
                          dpo_rewards_png=str(out / "rewards.png"))
    assert sorted(p.name for p in out.iterdir()) == ["lengths.png", "n.json", "rewards.png"]
    assert set(read_json(out / "n.json")) == {"lengths_words", "dpo_rewards_last_step"}
    with pytest.raises(DataError, match="together"):
        draw_analysis_figures({}, set_paths=write_sets(results), lengths_png=str(out / "lengths.png"),
                              numbers=str(out / "n.json"), teacher_loss_paths=write_teacher_losses(results))
