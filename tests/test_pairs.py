"""Preference pairs: each rule and utility signal on hand-made scores, the zero-pairs error, input checks."""

from __future__ import annotations

import pytest

from montessori.errors import ConfigError, DataError
from montessori.io import read_json, read_jsonl, write_jsonl_atomic
from montessori.pairs import build_pairs

PROMPTS = {"g1": "<|im_start|>user\nWrite instructions like these: ...<|im_end|>\n<|im_start|>assistant\n",
           "g2": "<|im_start|>user\nAnother prompt<|im_end|>\n<|im_start|>assistant\n"}

# (id, group, influence, influence_vs_momentum): every candidate is "helpful" under the sign
# rule (the momentum confound); against the momentum-only step they split.
SCORES = [
    ("g1-c0", "g1", -0.30, -0.10),
    ("g1-c1", "g1", -0.20, 0.00),
    ("g1-c2", "g1", -0.15, 0.05),
    ("g1-c3", "g1", -0.05, 0.15),
    ("g2-c0", "g2", -0.22, 0.02),
    ("g2-c1", "g2", -0.21, 0.01),
]


def write_inputs(tmp_path, scores=SCORES):
    influence = tmp_path / "influence.jsonl"
    responses = tmp_path / "probing.jsonl"
    write_jsonl_atomic(influence, [
        {"id": i, "group": g, "loss_before": 2.0, "loss_after": 2.0 + s, "influence": s,
         "influence_vs_momentum": m} for i, g, s, m in scores])
    write_jsonl_atomic(responses, [
        {"id": i, "group": g, "prompt": PROMPTS[g], "raw_output": f" raw output of {i}\n",
         "instruction": f"instruction {i}", "response": f"response {i}"} for i, g, _, _ in scores])
    return influence, responses


def run(tmp_path, settings, scores=SCORES):
    influence, responses = write_inputs(tmp_path, scores)
    out, summary = tmp_path / "pairs.jsonl", tmp_path / "pairs_summary.json"
    build_pairs(settings, scores=str(influence), responses=str(responses), out=str(out), summary=str(summary))
    return read_jsonl(out), read_json(summary)


def ids(pairs):
    return [(p["chosen_id"], p["rejected_id"]) for p in pairs]


def test_sign_pairs_every_helpful_with_every_harmful_sibling(tmp_path):
    scores = [("g1-c0", "g1", -0.3, 0), ("g1-c1", "g1", -0.1, 0), ("g1-c2", "g1", 0.0, 0),
              ("g1-c3", "g1", 0.2, 0), ("g2-c0", "g2", 0.1, 0), ("g2-c1", "g2", 0.4, 0)]
    pairs, summary = run(tmp_path, {"rule": "sign"}, scores)
    # zero influence is neither helpful nor harmful; g2 has no helpful sibling.
    assert ids(pairs) == [("g1-c0", "g1-c3"), ("g1-c1", "g1-c3")]
    assert summary["groups"] == 2 and summary["groups_with_pairs"] == 1 and summary["pairs"] == 2
    first = pairs[0]
    assert first["prompt"] == PROMPTS["g1"]                   # the exact chat-formatted prompt
    assert first["chosen"] == " raw output of g1-c0\n"        # the teacher's raw outputs, verbatim
    assert first["rejected"] == " raw output of g1-c3\n"
    assert (first["chosen_score"], first["rejected_score"]) == (-0.3, 0.2)
    assert first["group"] == "g1"


def test_momentum_pairs_on_influence_against_the_momentum_step(tmp_path):
    pairs, summary = run(tmp_path, {"rule": "momentum"})
    assert ids(pairs) == [("g1-c0", "g1-c2"), ("g1-c0", "g1-c3")]
    assert [p["chosen_score"] for p in pairs] == [-0.10, -0.10]
    assert summary["score"] == "influence_vs_momentum"
    assert (summary["groups_with_pairs"], summary["pairs"]) == (1, 2)


def test_the_summary_counts_what_the_other_rules_would_pair_from_the_same_scores(tmp_path):
    pairs, summary = run(tmp_path, {"rule": "momentum"})
    assert ids(pairs) == [("g1-c0", "g1-c2"), ("g1-c0", "g1-c3")]
    # sign: every candidate's influence is negative, so nothing; rank on influence: g1-c0 > g1-c3
    # (one of momentum's pairs) and g2-c0 > g2-c1.
    assert summary["other_rules"] == {
        "sign": {"score": "influence", "groups_with_pairs": 0, "pairs": 0, "shared": 0},
        "rank": {"score": "influence", "groups_with_pairs": 2, "pairs": 2, "shared": 1}}


def test_rank_pairs_best_against_worst_above_the_margin(tmp_path):
    pairs, summary = run(tmp_path, {"rule": "rank", "min_margin": 0.05})
    # g1 spread 0.25 >= 0.05; g2 spread 0.01 < 0.05.
    assert ids(pairs) == [("g1-c0", "g1-c3")]
    assert summary["groups_with_pairs"] == 1
    pairs, _ = run(tmp_path, {"rule": "rank", "min_margin": 0.0})
    assert ids(pairs) == [("g1-c0", "g1-c3"), ("g2-c0", "g2-c1")]


def test_rank_never_pairs_equal_scores(tmp_path):
    scores = [("g1-c0", "g1", -0.1, 0), ("g1-c1", "g1", -0.1, 0), ("g2-c0", "g2", 0.3, 0), ("g2-c1", "g2", 0.1, 0)]
    pairs, _ = run(tmp_path, {"rule": "rank", "min_margin": 0.0}, scores)
    assert ids(pairs) == [("g2-c1", "g2-c0")]


def test_sign_finds_no_pairs_when_every_candidate_is_helpful(tmp_path):
    with pytest.raises(DataError) as err:
        run(tmp_path, {"rule": "sign"})
    message = str(err.value)
    assert "pairs.rule: sign found no preference pairs in 2 groups" in message
    assert "6 of 6 candidates have influence < 0" in message
    assert "pairs.rule: momentum" in message and "rank" in message
    assert not (tmp_path / "pairs.jsonl").exists()


def test_rank_margin_too_large_says_what_to_lower(tmp_path):
    with pytest.raises(DataError, match=r"pairs.rule: rank found no.*largest spread 0.25.*lower pairs.min_margin"):
        run(tmp_path, {"rule": "rank", "min_margin": 1.0})


def test_momentum_finds_no_pairs_points_to_rank(tmp_path):
    scores = [(i, g, s, abs(m) + 0.01) for i, g, s, m in SCORES]
    with pytest.raises(DataError, match="pairs.rule: momentum found no.*set pairs.rule: rank"):
        run(tmp_path, {"rule": "momentum"}, scores)


def test_unknown_rule_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="pairs.rule"):
        run(tmp_path, {"rule": "best"})


def test_unscored_probing_record_is_an_error(tmp_path):
    influence, responses = write_inputs(tmp_path)
    write_jsonl_atomic(influence, read_jsonl(influence)[:-1])
    with pytest.raises(DataError, match=r"1 probing records .* have no score .*g2-c1"):
        build_pairs({"rule": "rank"}, scores=str(influence), responses=str(responses),
                    out=str(tmp_path / "p.jsonl"), summary=str(tmp_path / "s.json"))


def test_non_finite_score_is_an_error(tmp_path):
    scores = [*SCORES[:-1], ("g2-c1", "g2", float("nan"), 0.0)]
    with pytest.raises(DataError, match="g2-c1.*influence=nan"):
        run(tmp_path, {"rule": "rank"}, scores)


def test_siblings_with_different_prompts_are_an_error(tmp_path):
    influence, responses = write_inputs(tmp_path)
    records = read_jsonl(responses)
    records[1]["prompt"] = "something else"
    write_jsonl_atomic(responses, records)
    with pytest.raises(DataError, match="group 'g1' have 2 different prompts"):
        build_pairs({"rule": "rank"}, scores=str(influence), responses=str(responses),
                    out=str(tmp_path / "p.jsonl"), summary=str(tmp_path / "s.json"))


# ---- pairs.signal: the utility-signal ablation ---------------------------------------------------

def run_signal(tmp_path, settings, records):
    """Pairs from a score file of the signal's own records (id, group, and its score key)."""
    scores, responses = tmp_path / "scores.jsonl", tmp_path / "probing.jsonl"
    write_jsonl_atomic(scores, records)
    write_jsonl_atomic(responses, [
        {"id": r["id"], "group": r["group"], "prompt": PROMPTS[r["group"]], "raw_output": f"raw {r['id']}"}
        for r in records])
    out, summary = tmp_path / "pairs.jsonl", tmp_path / "pairs_summary.json"
    build_pairs(settings, scores=str(scores), responses=str(responses), out=str(out), summary=str(summary))
    return read_jsonl(out), read_json(summary)


def test_loss_signal_prefers_the_sibling_the_student_already_fits_best(tmp_path):
    # probe_loss is all the loss signal reads: influence says the opposite here and must be ignored
    records = [{"id": i, "group": g, "probe_loss": loss, "influence": -loss}
               for i, g, loss in [("g1-c0", "g1", 1.9), ("g1-c1", "g1", 0.7), ("g1-c2", "g1", 1.2),
                                  ("g2-c0", "g2", 2.5), ("g2-c1", "g2", 2.5)]]
    pairs, summary = run_signal(tmp_path, {"signal": "loss", "rule": "rank"}, records)
    assert ids(pairs) == [("g1-c1", "g1-c0")]          # lowest loss chosen; g2's siblings tie
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (0.7, 1.9)
    assert summary["signal"] == "loss" and summary["score"] == "probe_loss"
    assert summary["higher_is_better"] is False
    assert summary["other_rules"] == {}     # rank is the only rule of a loss or judge score


def test_judge_signal_prefers_the_higher_rating_and_skips_unrated_probes(tmp_path):
    records = [{"id": i, "group": g, "judge_score": score}
               for i, g, score in [("g1-c0", "g1", 3.0), ("g1-c1", "g1", 8.5), ("g1-c2", "g1", None),
                                   ("g2-c0", "g2", None), ("g2-c1", "g2", 9.0)]]
    pairs, summary = run_signal(tmp_path, {"signal": "judge", "rule": "rank", "min_margin": 1.0}, records)
    assert ids(pairs) == [("g1-c1", "g1-c0")]          # highest rating chosen; g2 has one rated sibling
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (8.5, 3.0)
    assert summary["candidates"] == 3 and summary["candidates_without_score"] == 2
    assert summary["higher_is_better"] is True and summary["groups_with_pairs"] == 1


def test_judge_margin_applies_to_the_rating_spread(tmp_path):
    records = [{"id": "g1-c0", "group": "g1", "judge_score": 6.0}, {"id": "g1-c1", "group": "g1", "judge_score": 6.5}]
    with pytest.raises(DataError, match=r"pairs.rule: rank found no.*largest spread 0.5"):
        run_signal(tmp_path, {"signal": "judge", "rule": "rank", "min_margin": 1.0}, records)


def test_a_missing_score_is_an_error_for_the_loss_signal(tmp_path):
    records = [{"id": "g1-c0", "group": "g1", "probe_loss": None}, {"id": "g1-c1", "group": "g1", "probe_loss": 1.0}]
    with pytest.raises(DataError, match="g1-c0.*probe_loss=None"):
        run_signal(tmp_path, {"signal": "loss", "rule": "rank"}, records)


def test_influence_records_without_probe_loss_name_the_field(tmp_path):
    """An influence table written before probe_loss was recorded: rerun influence for the loss signal."""
    with pytest.raises(DataError, match="has no 'probe_loss'"):
        run(tmp_path, {"signal": "loss", "rule": "rank"})


@pytest.mark.parametrize("signal", ["loss", "judge"])
@pytest.mark.parametrize("rule", ["sign", "momentum"])
def test_zero_split_rules_do_not_apply_to_loss_or_judge(tmp_path, signal, rule):
    with pytest.raises(ConfigError, match=rf"config key 'pairs.rule': rule '{rule}' does not apply to "
                                          rf"pairs.signal '{signal}'.*set pairs.rule: rank"):
        run(tmp_path, {"signal": signal, "rule": rule})


def test_unknown_signal_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="config key 'pairs.signal'"):
        run(tmp_path, {"signal": "vibes", "rule": "rank"})


def test_influence_signal_is_the_default_and_reads_influence(tmp_path):
    explicit, summary = run(tmp_path, {"signal": "influence", "rule": "rank"})
    default, _ = run(tmp_path, {"rule": "rank"})
    assert explicit == default and summary["score"] == "influence" and summary["signal"] == "influence"
