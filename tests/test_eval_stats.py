"""The report's bootstrap intervals on cases whose answer is known."""

import math

import numpy as np
import pytest

from montessori.errors import DataError
from montessori.evaluation.stats import bootstrap_interval, paired_difference


def _ids(values):
    return {f"item-{i}": v for i, v in enumerate(values)}


def test_constant_differences_give_a_zero_width_interval_at_that_value():
    first = _ids([3.0, 5.5, 1.0, 8.0, 2.0])
    second = _ids([2.5, 5.0, 0.5, 7.5, 1.5])
    result = paired_difference(first, second, seed=1)
    assert result["difference"] == pytest.approx(0.5)
    assert result["low"] == pytest.approx(0.5) and result["high"] == pytest.approx(0.5)
    assert result["distinguishable"] is True
    assert result["n"] == 5 and result["n_missing"] == 0


def test_identical_students_are_not_distinguishable():
    scores = _ids([1.0, 2.0, 3.0, 4.0])
    result = paired_difference(scores, dict(scores), seed=1)
    assert (result["difference"], result["low"], result["high"]) == (0.0, 0.0, 0.0)
    assert result["distinguishable"] is False


def test_symmetric_differences_give_an_interval_centred_on_zero():
    # differences x and -x: the bootstrap distribution of their mean is symmetric about 0 (its 2.5%
    # quantile from 9999 resamples is within about 0.002 of the exact one here)
    half = np.random.default_rng(3).normal(size=100)
    second = _ids([5.0] * 200)
    first = _ids(list(5.0 + half) + list(5.0 - half))
    result = paired_difference(first, second, seed=7)
    assert result["difference"] == pytest.approx(0.0, abs=1e-12)
    assert result["low"] < 0 < result["high"]
    assert result["low"] == pytest.approx(-result["high"], abs=0.02)
    assert result["distinguishable"] is False


def test_interval_matches_the_normal_approximation_for_many_items():
    values = np.random.default_rng(0).normal(loc=1.0, scale=2.0, size=400)
    interval = bootstrap_interval(values, seed=3)
    half_width = 1.959964 * values.std(ddof=1) / math.sqrt(len(values))
    assert interval["estimate"] == pytest.approx(values.mean())
    assert interval["low"] == pytest.approx(values.mean() - half_width, rel=0.1)
    assert interval["high"] == pytest.approx(values.mean() + half_width, rel=0.1)
    assert (interval["high"] - interval["low"]) / 2 == pytest.approx(half_width, rel=0.05)


def test_a_clear_difference_is_distinguishable_and_its_sign_kept():
    rng = np.random.default_rng(1)
    base = rng.normal(size=50)
    result = paired_difference(_ids(base - 1.0 + rng.normal(scale=0.1, size=50)), _ids(base), seed=2)
    assert result["high"] < 0 and result["distinguishable"] is True
    assert result["low"] < result["difference"] < result["high"]


def test_the_same_seed_gives_the_same_numbers_and_another_seed_others():
    rng = np.random.default_rng(5)
    first, second = _ids(rng.normal(size=30)), _ids(rng.normal(size=30))
    assert paired_difference(first, second, seed=11) == paired_difference(first, second, seed=11)
    assert paired_difference(first, second, seed=11)["low"] != paired_difference(first, second, seed=12)["low"]


def test_mismatched_item_ids_name_both_files():
    with pytest.raises(DataError, match=r"a/items.jsonl and b/items.jsonl: the item ids differ.*item-9"):
        paired_difference(_ids([1.0, 2.0]), {"item-0": 1.0, "item-9": 2.0}, seed=0,
                          labels=("a/items.jsonl", "b/items.jsonl"))


def test_items_unscored_by_either_student_are_left_out_of_both():
    first = {"q1": 4.0, "q2": None, "q3": 6.0, "q4": float("nan")}
    second = {"q1": 3.0, "q2": 9.0, "q3": 5.0, "q4": 1.0}
    result = paired_difference(first, second, seed=0)
    assert result["difference"] == pytest.approx(1.0)
    assert result["n"] == 2 and result["n_missing"] == 2


def test_weighted_difference_is_the_difference_of_token_weighted_means():
    tokens = {"a": 10, "b": 30, "c": 60}
    first, second = {"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 2.0, "b": 2.0, "c": 2.0}
    result = paired_difference(first, second, seed=0, weights=(tokens, dict(tokens)))
    weighted = lambda scores: sum(scores[i] * tokens[i] for i in tokens) / sum(tokens.values())  # noqa: E731
    assert result["difference"] == pytest.approx(weighted(first) - weighted(second))
    assert result["low"] <= result["difference"] <= result["high"]


def test_weights_that_differ_between_students_are_refused():
    with pytest.raises(DataError, match=r"item 'a' weighs 10 in one and 12 in the other"):
        paired_difference({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0}, seed=0, labels=("x", "y"),
                          weights=({"a": 10, "b": 5}, {"a": 12, "b": 5}))


def test_one_item_has_no_interval():
    result = paired_difference({"a": 2.0}, {"a": 1.0}, seed=0)
    assert result["difference"] == 1.0
    assert result["low"] is None and result["high"] is None and result["distinguishable"] is None


def test_no_common_scored_item_is_an_error():
    with pytest.raises(DataError, match="no item has a score in both"):
        paired_difference({"a": None}, {"a": 1.0}, seed=0, labels=("x", "y"))
