"""AlpacaEval 2 metrics from pairwise preferences, computed as alpaca_eval computes them.

A preference is alpaca_eval's: 1 = the first output (the reference) wins, 2 = the second (the
model) wins, anything in between is a probability-weighted preference, 1.5 (or the legacy 0) a
draw, NaN a missing judgement (dropped). Win rates are in percent, as on the leaderboard.

- `win_rate`, `standard_error`, `n_*`: alpaca_eval's `AbsoluteScoringRule.describe_head2head`.
- `discrete_win_rate`: the same on preferences rounded to 1 / 1.5 / 2 (`ZeroOneScoringRule`).
- Length control, AlpacaEval 2's GLM (`glm_winrate.py`): logistic regression of the preference on
  tanh(standardized length difference) and a model term (plus, in `length_controlled_v1`, the
  instruction difficulty), fit by 5-fold grouped CV with an L1 penalty on the continuous targets,
  then predicted with the length difference set to 0 and averaged. `length_controlled_v1` also
  regularizes towards the "gamed baseline" annotations; the difficulties and those annotations are
  files of the AlpacaEval dataset (`instruction_difficulty.csv`, `df_gamed.csv`). Given them, the
  result is the leaderboard's `length_controlled_winrate`; without them the GLM keeps the length
  and model terms, alpaca_eval's `length_controlled_minimal`, reported under that name only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

REGULARIZE_TO_BASELINE_LAMBDA = 0.2
CV_SPLITS = 5
# alpaca_eval's fallback when it fits without cross-validation.
NO_CV_C = 100


def _as_float_series(preferences: Sequence) -> pd.Series:
    series = pd.Series(list(preferences), dtype="object").map(lambda v: np.nan if v is None else v)
    return series.astype(float).replace({0.0: 1.5})


def _is_preference(series: pd.Series) -> pd.Series:
    return series.apply(lambda x: (not math.isnan(x)) and 1 <= x <= 2)


def win_points(preference) -> float | None:
    """One annotation's term of the win rate, in points of 100 (their mean is describe_head2head's
    win_rate): None for a missing or out-of-range preference, the legacy 0 counted as a draw."""
    if preference is None:
        return None
    value = 1.5 if float(preference) == 0.0 else float(preference)
    return (value - 1.0) * 100.0 if 1.0 <= value <= 2.0 else None


def describe_head2head(preferences: Sequence, discrete: bool = False) -> dict:
    """alpaca_eval's head-to-head summary: win rate (%), its standard error, win/loss/draw counts."""
    series = _as_float_series(preferences)
    if discrete:
        # ZeroOneScoringRule: 1.5 -> draw, then round to the nearest of 1, 2 (exact halves are draws).
        series = series.map(lambda x: x if math.isnan(x) or x == 1.5 else float(np.round(x)))
    n_draws = int((series == 1.5).sum())
    kept = series[_is_preference(series)] - 1
    n_total = len(kept)
    return {
        "win_rate": float(kept.mean() * 100) if n_total else float("nan"),
        "standard_error": float(kept.sem() * 100) if n_total > 1 else float("nan"),
        "n_wins": int((kept > 0.5).sum()),
        "n_wins_base": int((kept < 0.5).sum()),
        "n_draws": n_draws,
        "n_total": n_total,
    }


def win_rate_metrics(preferences: Sequence) -> dict:
    """alpaca_eval's `get_winrate`: the weighted summary plus the discrete win rate."""
    metrics = describe_head2head(preferences)
    metrics["discrete_win_rate"] = describe_head2head(preferences, discrete=True)["win_rate"]
    return metrics


def _logistic(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -x))


def _logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
    """alpaca_eval's CV score: log loss against the continuous targets hidden in the sample weights."""
    y_true = np.where(np.asarray(y_true) == 1, np.asarray(true_prob), 1 - np.asarray(true_prob))
    y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
    losses = y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred)
    if true_sample_weight is not None:
        losses = losses * np.asarray(true_sample_weight)
    return -np.mean(losses)


def _fit_glm(features: pd.DataFrame, targets: np.ndarray, sample_weight: np.ndarray | None):
    """alpaca_eval's `fit_LogisticRegressionCV` with continuous targets: each row twice, as y=1
    weighted by p and as y=0 weighted by 1-p; grouped 5-fold CV over C with an L1 penalty."""
    import sklearn
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    n = len(features)
    x = pd.concat([features, features], axis=0).reset_index(drop=True)
    y = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    true_prob = np.concatenate([targets, 1 - targets])
    groups = np.concatenate([np.arange(n), np.arange(n)])
    if sample_weight is None:
        true_sample_weight = None
        weight = true_prob
    else:
        true_sample_weight = np.concatenate([sample_weight, sample_weight])
        weight = true_prob * true_sample_weight
    common = {"random_state": 123, "dual": False, "solver": "liblinear", "fit_intercept": False}
    with sklearn.config_context(enable_metadata_routing=True):
        if n >= CV_SPLITS:
            scorer = make_scorer(
                _logloss_continuous, response_method="predict_proba", greater_is_better=False
            ).set_score_request(true_sample_weight=True, true_prob=True)
            model = LogisticRegressionCV(cv=GroupKFold(n_splits=CV_SPLITS), scoring=scorer,
                                         l1_ratios=(1.0,), use_legacy_attributes=False, **common)
            model.set_fit_request(sample_weight=True)
            model.fit(x, y, sample_weight=weight, groups=groups,
                      true_sample_weight=true_sample_weight, true_prob=true_prob)
        else:
            model = LogisticRegression(C=NO_CV_C, l1_ratio=1.0, **common)
            model.set_fit_request(sample_weight=True)
            model.fit(x, y, sample_weight=weight)
    return model


def length_controlled_winrate(preferences: Sequence, reference_lengths: Sequence[int],
                              model_lengths: Sequence[int], *, same_generator: bool = False,
                              instruction_difficulty: Sequence[float] | None = None,
                              gamed: pd.DataFrame | None = None) -> float:
    """The AlpacaEval 2 length-controlled win rate (%) of the model (output_2) over the reference.

    `instruction_difficulty[i]` is the difficulty of row i (alpaca_eval indexes it by row
    position in the 805-row set); `gamed` is alpaca_eval's `df_gamed.csv` (columns `index`,
    `preference` in [0, 1], `std_delta_len`, `instruction_difficulty`, `not_gamed_baseline`).
    """
    if same_generator:
        return 50.0
    series = _as_float_series(preferences)
    delta = pd.Series(np.asarray(reference_lengths, dtype=float) - np.asarray(model_lengths, dtype=float))
    spread = delta.std()
    # alpaca_eval divides by the std unguarded; equal length differences carry no length signal.
    std_delta = delta / spread if spread and not math.isnan(spread) else delta * 0.0
    frame = pd.DataFrame({"preference": series - 1, "std_delta_len": std_delta.to_numpy(),
                          "not_gamed_baseline": True})
    terms = ["np.tanh(std_delta_len)", "not_gamed_baseline.astype(float)"]
    if instruction_difficulty is not None:
        frame["instruction_difficulty"] = np.asarray(instruction_difficulty, dtype=float)
        terms.insert(1, "instruction_difficulty")
    sample_weight = None
    train = frame
    if gamed is not None:
        if instruction_difficulty is None:
            raise ValueError("the gamed-baseline regularization needs the instruction difficulties")
        gamed_rows = gamed[["preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"]]
        train = pd.concat([gamed_rows, frame[gamed_rows.columns]], axis=0).reset_index(drop=True)
        not_gamed = train["not_gamed_baseline"].astype(bool)
        # divided by 2 because alpaca_eval's gamed set holds two gamed baselines
        sample_weight = (not_gamed.astype(float)
                         + (REGULARIZE_TO_BASELINE_LAMBDA * (~not_gamed)).astype(float) / 2).to_numpy()

    def design(rows: pd.DataFrame) -> pd.DataFrame:
        columns = {
            "np.tanh(std_delta_len)": np.tanh(rows["std_delta_len"].astype(float)),
            "instruction_difficulty": rows.get("instruction_difficulty"),
            "not_gamed_baseline.astype(float)": rows["not_gamed_baseline"].astype(float),
        }
        return pd.DataFrame({term: columns[term].to_numpy() for term in terms})

    keep = train["preference"].notna().to_numpy()
    model = _fit_glm(design(train[keep]), train["preference"][keep].to_numpy(dtype=float),
                     None if sample_weight is None else sample_weight[keep])
    test = frame.assign(std_delta_len=0.0)
    return float(model.predict_proba(design(test))[:, 1].mean() * 100)


FULL_LENGTH_CONTROL = "length_controlled_v1"
MINIMAL_LENGTH_CONTROL = "length_controlled_minimal"


def alpaca_eval_metrics(annotations: Sequence[dict], instruction_difficulty: Sequence[float] | None = None,
                        gamed: pd.DataFrame | None = None) -> dict:
    """Every leaderboard number for one annotation file (rows with `preference`, `output_1`,
    `output_2`, and optionally `generator_1`, `generator_2`).

    With both the instruction difficulties (one per row) and the gamed annotations the
    length-controlled win rate is `length_controlled_v1`, under the leaderboard's name
    `length_controlled_winrate`; with neither it is `length_controlled_minimal`, under that name.
    `length_control` says which one was computed.
    """
    if (instruction_difficulty is None) != (gamed is None):
        raise ValueError("length_controlled_v1 needs both the instruction difficulties and the gamed annotations; "
                         "give both, or neither for length_controlled_minimal")
    preferences = [row.get("preference") for row in annotations]
    metrics = win_rate_metrics(preferences)
    generators_1 = {row.get("generator_1") for row in annotations}
    generators_2 = {row.get("generator_2") for row in annotations}
    same = len(generators_1) == 1 and generators_1 == generators_2 and None not in generators_1
    full = gamed is not None
    metrics["length_control"] = FULL_LENGTH_CONTROL if full else MINIMAL_LENGTH_CONTROL
    metrics["length_controlled_winrate" if full else MINIMAL_LENGTH_CONTROL] = length_controlled_winrate(
        preferences, [len(row["output_1"]) for row in annotations], [len(row["output_2"]) for row in annotations],
        same_generator=same, instruction_difficulty=instruction_difficulty, gamed=gamed,
    )
    return metrics
