"""Bootstrap intervals for the report: one student's mean, and the paired difference of two students.

Every evaluation scores every student on the same items (AlpacaEval instructions, MT-Bench
questions, NLL answers), so two students are compared item by item: the bootstrap resamples
items, keeping each item's two scores together (scipy's `paired=True`), which removes the
between-item variance a comparison of two independent intervals would carry.

Means may be weighted (the NLL is a token mean: items weighted by their response tokens). With
common weights, the difference of the two weighted means is the weighted mean of the per-item
differences, which is what is resampled. Intervals are percentile intervals (not BCa: BCa is
undefined when every resample gives the same value, e.g. constant differences).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..errors import DataError

CONFIDENCE = 0.95
RESAMPLES = 9999  # scipy's default


def _weighted_mean(values, weights, axis=-1):
    return (values * weights).sum(axis=axis) / weights.sum(axis=axis)


def bootstrap_interval(values: Sequence[float], seed: int, weights: Sequence[float] | None = None,
                       confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> dict:
    """{"estimate", "low", "high", "n"}: the (weighted) mean of `values` and its percentile
    bootstrap interval over items; low/high are None with fewer than two items (no spread to
    resample)."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    weight = np.ones_like(data) if weights is None else np.asarray(weights, dtype=float)
    if data.shape != weight.shape:
        raise ValueError(f"{len(data)} values but {len(weight)} weights")
    if len(data) == 0:
        raise ValueError("no values to bootstrap")
    if (weight <= 0).any():
        raise ValueError("weights must be positive")
    estimate = float(_weighted_mean(data, weight))
    if len(data) < 2:
        return {"estimate": estimate, "low": None, "high": None, "n": len(data)}
    result = bootstrap((data, weight), _weighted_mean, paired=True, vectorized=True, n_resamples=resamples,
                       confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = (float(bound) for bound in (result.confidence_interval.low, result.confidence_interval.high))
    # a constant statistic: the percentile bounds may differ from it by float rounding only
    return {"estimate": estimate, "low": min(low, estimate), "high": max(high, estimate), "n": len(data)}


def paired_difference(first: Mapping[str, float | None], second: Mapping[str, float | None], seed: int,
                      labels: tuple[str, str] = ("first", "second"),
                      weights: tuple[Mapping[str, float], Mapping[str, float]] | None = None,
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> dict:
    """first - second over the items both scored: {"difference", "low", "high", "n", "n_missing",
    "distinguishable"}.

    `first` and `second` map item id -> score (None = the item was not scored, e.g. a judgement
    without a rating: that item is left out of both). `labels` name the two sources (files) in
    errors. `weights` (item id -> weight, one mapping per side) must agree item by item: the NLL's
    token counts, equal when both students tokenize alike. `distinguishable` is whether the
    interval excludes zero (None when there is no interval)."""
    first_ids, second_ids = set(first), set(second)
    if first_ids != second_ids:
        only_first, only_second = sorted(first_ids - second_ids), sorted(second_ids - first_ids)
        raise DataError(f"paired comparison of {labels[0]} and {labels[1]}: the item ids differ "
                        f"({len(only_first)} only in {labels[0]}, e.g. {only_first[:3]}; {len(only_second)} only in "
                        f"{labels[1]}, e.g. {only_second[:3]}); both must score the same items")
    ids = sorted(i for i in first_ids if not _missing(first[i]) and not _missing(second[i]))
    if not ids:
        raise DataError(f"paired comparison of {labels[0]} and {labels[1]}: no item has a score in both")
    item_weights = None
    if weights is not None:
        for i in ids:
            if weights[0][i] != weights[1][i]:
                raise DataError(f"paired comparison of {labels[0]} and {labels[1]}: item {i!r} weighs "
                                f"{weights[0][i]} in one and {weights[1][i]} in the other (different tokenizers?)")
        item_weights = [weights[0][i] for i in ids]
    interval = bootstrap_interval([first[i] - second[i] for i in ids], seed, item_weights, confidence, resamples)
    distinguishable = None if interval["low"] is None else bool(interval["low"] > 0 or interval["high"] < 0)
    return {"difference": interval["estimate"], "low": interval["low"], "high": interval["high"], "n": len(ids),
            "n_missing": len(first_ids) - len(ids), "distinguishable": distinguishable}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
