"""The paper's analysis figures, from files the pipeline already writes.

- influence per round (`round<k>/influence/influence.jsonl`): the distribution of each probe's
  reference-loss change, and the share of probes whose influence is helpful (negative) with a
  Wilson 95% interval. Both scores are shown: `influence` (the paper's sign rule) and
  `influence_vs_momentum` (against the momentum-only step; what `pairs.rule: momentum` uses).
  Round k's probes are written by the teacher as round k-1's DPO left it, so a rising helpful
  share across rounds is the paper's claim that the teacher learns to write more helpful data.
- instruction and response lengths (words) per synthesized set and round
  (`round<k>/probes/responses.jsonl`, `round<k>/<method>/train/responses.jsonl`).
- the teacher's DPO reward margins and accuracies over its steps per round
  (`round<k>/teacher_loss.json`: TRL's `rewards/*` entries of the log history, see
  training._loss_history).

Each figure's numbers come from a pure function (tested on hand-made files); the plotting
functions only draw them. `numbers.json` keeps the numbers next to the figures.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import DataError
from .io import atomic_path, iter_jsonl_numbered, read_json, write_json_atomic

INFLUENCE_SCORES = ("influence", "influence_vs_momentum")
SCORE_AXIS_LABELS = {
    "influence": "influence: reference-loss change (< 0 helpful)",
    "influence_vs_momentum": "influence_vs_momentum: vs the momentum-only step (< 0 helpful)",
}
REWARD_KEYS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
# z of a two-sided 95% normal interval
Z_95 = 1.959963984540054


# --- where a file belongs -------------------------------------------------------------------

def round_of(path: str | Path) -> int:
    """k of the `round<k>` directory a pipeline file lies under."""
    rounds = [int(match.group(1)) for part in Path(path).parts if (match := re.fullmatch(r"round(\d+)", part))]
    if not rounds:
        raise DataError(f"{path}: not under a round<k> directory")
    return rounds[-1]


def set_label(path: str | Path) -> str:
    """`probes` for round<k>/probes/responses.jsonl, `<method>` for round<k>/<method>/train/responses.jsonl."""
    parts = Path(path).parts
    rounds = [index for index, part in enumerate(parts) if re.fullmatch(r"round\d+", part)]
    # the round directory, the set's directory, at least the file itself
    if not rounds or len(parts) - rounds[-1] < 3:
        raise DataError(f"{path}: expected round<k>/probes/<file> or round<k>/<method>/train/<file>")
    return parts[rounds[-1] + 1]


# --- influence ------------------------------------------------------------------------------

def influence_by_round(paths: list[str]) -> dict[int, dict[str, list[float]]]:
    """{round: {score: [value per probe]}} for both INFLUENCE_SCORES."""
    scores: dict[int, dict[str, list[float]]] = {}
    for path in paths:
        k = round_of(path)
        if k in scores:
            raise DataError(f"{path}: a second influence file for round {k}")
        scores[k] = {key: [] for key in INFLUENCE_SCORES}
        for line_no, record in iter_jsonl_numbered(path):
            for key in INFLUENCE_SCORES:
                value = record.get(key)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise DataError(f"{path}:{line_no}: '{key}' is not a finite number: {value!r}")
                scores[k][key].append(float(value))
        if not scores[k]["influence"]:
            raise DataError(f"{path}: no influence records")
    return dict(sorted(scores.items()))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: stays inside [0, 1] and is not empty at
    0 or n successes, where the normal approximation collapses."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def helpful_shares(scores: dict[int, dict[str, list[float]]]) -> list[dict]:
    """Per round and score: probes, helpful (influence < 0) probes, their share and its Wilson 95% interval."""
    rows = []
    for k, by_score in scores.items():
        for key in INFLUENCE_SCORES:
            values = by_score[key]
            helpful = sum(value < 0 for value in values)
            low, high = wilson_interval(helpful, len(values))
            rows.append({"round": k, "score": key, "n": len(values), "helpful": helpful,
                         "share": helpful / len(values), "low": low, "high": high})
    return rows


# --- lengths --------------------------------------------------------------------------------

def word_count(text: str) -> int:
    return len(text.split())


def lengths_by_set(paths: list[str]) -> dict[tuple[str, int], dict[str, list[int]]]:
    """{(set, round): {"instruction": [words], "response": [words]}} from synthesized response files."""
    lengths: dict[tuple[str, int], dict[str, list[int]]] = {}
    for path in paths:
        key = (set_label(path), round_of(path))
        if key in lengths:
            raise DataError(f"{path}: a second file for set {key[0]} of round {key[1]}")
        lengths[key] = {"instruction": [], "response": []}
        for line_no, record in iter_jsonl_numbered(path):
            for field in ("instruction", "response"):
                if not isinstance(record.get(field), str):
                    raise DataError(f"{path}:{line_no}: no string '{field}'")
                lengths[key][field].append(word_count(record[field]))
    return dict(sorted(lengths.items(), key=lambda item: (item[0][1], item[0][0] != "probes", item[0][0])))


def _quantile(sorted_values: list[int], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def length_summary(lengths: dict[tuple[str, int], dict[str, list[int]]]) -> list[dict]:
    """Per set, round and field: n, mean, median and quartiles of the word counts."""
    rows = []
    for (label, k), fields in lengths.items():
        for field, values in fields.items():
            ordered = sorted(values)
            rows.append({"set": label, "round": k, "field": field, "n": len(ordered),
                         "mean": sum(ordered) / len(ordered) if ordered else None,
                         **{name: _quantile(ordered, q) if ordered else None
                            for name, q in (("q1", 0.25), ("median", 0.5), ("q3", 0.75))}})
    return rows


# --- DPO rewards ----------------------------------------------------------------------------

def dpo_reward_curves(paths: list[str]) -> dict[int, dict[str, list[float]]]:
    """{round: {"step": [...], "rewards/margins": [...], ...}} from the teacher's loss records."""
    curves = {}
    for path in paths:
        k = round_of(path)
        if k in curves:
            raise DataError(f"{path}: a second teacher loss record for round {k}")
        history = read_json(path).get("history")
        if not isinstance(history, list) or not history:
            raise DataError(f"{path}: no 'history' of training steps")
        curve = {"step": [], **{key: [] for key in REWARD_KEYS}}
        for index, entry in enumerate(history):
            missing = [key for key in ("step", *REWARD_KEYS) if key not in entry]
            if missing:
                raise DataError(f"{path}: history entry {index} has no {', '.join(missing)} (TRL's DPOTrainer logs "
                                f"rewards/* with every loss; was this written by a DPO run?)")
            curve["step"].append(entry["step"])
            for key in REWARD_KEYS:
                curve[key].append(float(entry[key]))
        curves[k] = curve
    return dict(sorted(curves.items()))


# --- drawing --------------------------------------------------------------------------------

def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_influence_distributions(scores: dict[int, dict[str, list[float]]], out: str) -> None:
    """One panel per score, one step histogram per round on shared bins, zero marked."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(INFLUENCE_SCORES), figsize=(11, 3.8), squeeze=False)
    for ax, key in zip(axes[0], INFLUENCE_SCORES):
        every = np.concatenate([by_score[key] for by_score in scores.values()])
        bins = np.histogram_bin_edges(every, bins=min(40, max(5, len(every) // 4)))
        for k, by_score in scores.items():
            ax.hist(by_score[key], bins=bins, histtype="step", linewidth=1.5, density=True,
                    label=f"round {k} (n={len(by_score[key])})")
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xlabel(SCORE_AXIS_LABELS[key])
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("influence of the teacher's probes per round")
    _save(fig, out)


def plot_helpful_shares(rows: list[dict], out: str) -> None:
    """Bars per round, one per score, with the Wilson 95% interval."""
    import matplotlib.pyplot as plt

    rounds = sorted({row["round"] for row in rows})
    width = 0.8 / len(INFLUENCE_SCORES)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(rounds) + 2), 3.8))
    for index, key in enumerate(INFLUENCE_SCORES):
        series = sorted((row for row in rows if row["score"] == key), key=lambda row: row["round"])
        positions = [rounds.index(row["round"]) + (index - (len(INFLUENCE_SCORES) - 1) / 2) * width for row in series]
        shares = [row["share"] for row in series]
        errors = [[row["share"] - row["low"] for row in series], [row["high"] - row["share"] for row in series]]
        ax.bar(positions, shares, width=width, yerr=errors, capsize=4, label=key, color=f"C{index}")
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(rounds)), [f"round {k}" for k in rounds])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of probes with influence < 0")
    ax.set_title("helpful probes per round (Wilson 95% interval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_lengths(lengths: dict[tuple[str, int], dict[str, list[int]]], out: str) -> None:
    """Box plots of instruction and response words, one box per (set, round)."""
    import matplotlib.pyplot as plt

    keys = list(lengths)
    labels = [f"{label}\nround {k}" for label, k in keys]
    fig, axes = plt.subplots(2, 1, figsize=(max(5.0, 1.1 * len(keys) + 2), 6.5), squeeze=False)
    for ax, field in zip(axes[:, 0], ("instruction", "response")):
        ax.boxplot([lengths[key][field] for key in keys], showmeans=True)
        ax.set_xticks(range(1, len(keys) + 1), labels, fontsize=8)
        ax.set_ylabel(f"{field} length (words)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title("lengths of the synthesized sets per method and round")
    _save(fig, out)


def plot_dpo_rewards(curves: dict[int, dict[str, list[float]]], out: str) -> None:
    """Reward margin (chosen - rejected) and reward accuracy over the teacher's DPO steps, per round."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    for k, curve in curves.items():
        axes[0, 0].plot(curve["step"], curve["rewards/margins"], marker=".", label=f"round {k}")
        axes[0, 1].plot(curve["step"], curve["rewards/accuracies"], marker=".", label=f"round {k}")
    axes[0, 0].axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    axes[0, 0].set_ylabel("reward margin (chosen - rejected)")
    axes[0, 1].set_ylabel("reward accuracy (chosen > rejected)")
    axes[0, 1].set_ylim(-0.05, 1.05)
    for ax in axes[0]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("teacher DPO rewards")
    _save(fig, out)


# --- stage ----------------------------------------------------------------------------------

def draw_analysis_figures(settings: dict, set_paths: list[str], lengths_png: str, numbers: str,
                          influence_paths: list[str] = (), teacher_loss_paths: list[str] = (),
                          influence_png: str | None = None, helpful_share_png: str | None = None,
                          dpo_rewards_png: str | None = None) -> None:
    """Stage `analysis_figures`: the length figure always; with the montessori method the teacher's
    DPO rewards, and the influence and helpful-share figures when the pairs come from influence
    (`pairs.signal` influence or loss; the judge signal computes none). settings: {} (none)."""
    import matplotlib

    matplotlib.use("Agg")
    if any((out is None) == bool(influence_paths) for out in (influence_png, helpful_share_png)):
        raise DataError("analysis_figures: influence paths and the influence and helpful-share figures "
                        "come together or not at all")
    if (dpo_rewards_png is None) == bool(teacher_loss_paths):
        raise DataError("analysis_figures: teacher loss paths and the DPO-reward figure come together or not at all")
    if not set_paths:
        raise DataError("analysis_figures: no synthesized sets were given (set_paths)")

    lengths = lengths_by_set(list(set_paths))
    plot_lengths(lengths, lengths_png)
    record: dict = {"lengths_words": length_summary(lengths)}
    if influence_paths:
        scores = influence_by_round(list(influence_paths))
        shares = helpful_shares(scores)
        plot_influence_distributions(scores, influence_png)
        plot_helpful_shares(shares, helpful_share_png)
        record["helpful_share"] = shares
    if teacher_loss_paths:
        curves = dpo_reward_curves(list(teacher_loss_paths))
        plot_dpo_rewards(curves, dpo_rewards_png)
        record["dpo_rewards_last_step"] = {
            str(k): {"step": curve["step"][-1], **{key: curve[key][-1] for key in REWARD_KEYS}}
            for k, curve in curves.items()}
    write_json_atomic(numbers, record)
