"""The run's report: one results table (students x metrics), plots, and what each stage cost.

Every evaluation file names its student inside it (`generator` of the AlpacaEval metrics,
`model` of the MT-Bench scores, the lm-eval results and the NLL summary), so the inputs are plain
lists of files in any order. Rows are students: `base`, then `<method>-round<k>` by round and method.

Statistics: each summary file has its per-item file beside it (AlpacaEval's annotations.json
beside metrics.json, MT-Bench's judgment.jsonl beside scores.json, the NLL items named by the
summary), and every pair of students is compared item by item with a seeded paired bootstrap
(evaluation/stats.py): the difference, its 95% interval, and whether that excludes zero.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

from .errors import DataError
from .evaluation.judges import MISSING_RATING
from .evaluation.metrics import win_points
from .evaluation.stats import CONFIDENCE, bootstrap_interval, paired_difference
from .io import atomic_path, iter_jsonl_numbered, read_json, write_text_atomic
from .seeding import derive_seed

log = logging.getLogger(__name__)

# length_controlled_winrate is AlpacaEval 2's length_controlled_v1; without its files the metrics
# hold length_controlled_minimal instead, and the table shows whichever was computed.
ALPACA_COLUMNS = ("win_rate", "standard_error", "discrete_win_rate", "length_controlled_winrate",
                  "length_controlled_minimal", "n_missing", "position_bias_first_rate", "position_bias_consistency")
MT_BENCH_COLUMNS = ("turn_1", "turn_2", "overall", "n_missing")
NLL_COLUMNS = ("nll", "nll_low", "nll_high", "n_items", "dropped_in_seed_pool", "dropped_in_reference")
# lm-eval reports a standard error; a normal interval of this many of them is drawn as its error bar
Z_95 = 1.959964
BENCHMARK_FIELDS = ("s", "h:m:s", "max_rss", "max_vms", "max_uss", "max_pss", "io_in", "io_out",
                    "mean_load", "cpu_time")


def student_order(name: str) -> tuple:
    """base first, then by round, then by method name."""
    if name == "base":
        return (0, 0, "")
    match = re.fullmatch(r"(.+)-round(\d+)", name)
    return (1, int(match.group(2)), match.group(1)) if match else (2, 0, name)


def _require(record: dict, key: str, path: str):
    if key not in record:
        raise DataError(f"{path}: no '{key}' field")
    return record[key]


def collect_metrics(alpaca_paths: list[str], mt_bench_paths: list[str], lm_eval_paths: list[str],
                    nll_paths: list[str] = ()) -> dict[str, dict]:
    """{student: {column: value}} from the evaluation outputs."""
    rows: dict[str, dict] = defaultdict(dict)
    for path in alpaca_paths:
        record = read_json(path)
        student = _require(record, "generator", path)
        # one comparison per reference: `dataset`, or the method whose student is the reference
        versus = record.get("reference", "dataset")
        for key in ALPACA_COLUMNS:
            if key in record:
                rows[student][f"alpaca_eval.vs_{versus}.{key}"] = record[key]
    for path in mt_bench_paths:
        record = read_json(path)
        student = _require(record, "model", path)
        for key in MT_BENCH_COLUMNS:
            rows[student][f"mt_bench.{key}"] = record.get(key)
    for path in lm_eval_paths:
        record = read_json(path)
        student = _require(record, "model", path)
        for task, result in _require(record, "tasks", path).items():
            for metric, value in result.get("metrics", {}).items():
                rows[student][f"lm_eval.{task}.{metric}"] = value
    for path in nll_paths:
        record = read_json(path)
        student = _require(record, "model", path)
        for key in NLL_COLUMNS:
            rows[student][f"nll.{key}"] = _require(record, key, path)
    return dict(rows)


# ---- per-item scores: what the paired bootstrap resamples ---------------------------------------
class ItemScores:
    """One student's per-item scores on one metric: {item id: score or None (not scored)}, the
    file they came from (named in errors) and optional per-item weights (the NLL's tokens)."""

    def __init__(self, path: Path, scores: dict, weights: dict | None = None):
        self.path, self.scores, self.weights = path, scores, weights


def alpaca_item_scores(metrics_path: str) -> ItemScores:
    """Per instruction, the student's win (100), draw (50) or loss (0) against the reference, or the
    judge's expected preference in between (None: no preference): the win rate is their mean."""
    path = Path(metrics_path).with_name("annotations.json")
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of annotations")
    scores = {}
    for n, row in enumerate(rows, start=1):
        instruction = row.get("instruction") if isinstance(row, dict) else None
        if not isinstance(instruction, str) or "preference" not in row:
            raise DataError(f"{path} row {n}: an annotation needs 'instruction' and 'preference'")
        if instruction in scores:
            raise DataError(f"{path} row {n}: instruction {instruction[:60]!r} annotated twice")
        scores[instruction] = win_points(row["preference"])
    return ItemScores(path, scores)


def mt_bench_item_scores(scores_path: str) -> ItemScores:
    """Per question, the mean rating of its judged turns (None when neither turn has a rating)."""
    path = Path(scores_path).with_name("judgment.jsonl")
    ratings: dict[str, list[float]] = {}
    for line_no, record in iter_jsonl_numbered(path):
        score = record.get("score")
        if "question_id" not in record or not isinstance(score, (int, float)):
            raise DataError(f"{path}:{line_no}: a judgment needs 'question_id' and a numeric 'score'")
        valid = ratings.setdefault(str(record["question_id"]), [])
        if score != MISSING_RATING:
            valid.append(float(score))
    return ItemScores(path, {question: (sum(v) / len(v) if v else None) for question, v in ratings.items()})


def nll_item_scores(summary_path: str) -> ItemScores:
    """Per item, the student's mean answer-token NLL, weighted by its answer tokens."""
    path = Path(summary_path).with_name(_require(read_json(summary_path), "items", summary_path))
    scores, weights = {}, {}
    for line_no, record in iter_jsonl_numbered(path):
        if "id" not in record or not isinstance(record.get("nll"), (int, float)) or not isinstance(
                record.get("tokens"), int) or record["tokens"] < 1:
            raise DataError(f"{path}:{line_no}: an NLL item needs 'id', a numeric 'nll' and 'tokens' >= 1")
        if str(record["id"]) in scores:
            raise DataError(f"{path}:{line_no}: item id {record['id']!r} appears twice")
        scores[str(record["id"])], weights[str(record["id"])] = float(record["nll"]), record["tokens"]
    return ItemScores(path, scores, weights)


def collect_item_scores(alpaca_paths: list[str], mt_bench_paths: list[str],
                        nll_paths: list[str]) -> dict[str, dict[str, ItemScores]]:
    """{metric column: {student: ItemScores}} for the metrics that have per-item scores."""
    items: dict[str, dict[str, ItemScores]] = defaultdict(dict)
    for path in alpaca_paths:
        record = read_json(path)
        versus = record.get("reference", "dataset")
        items[f"alpaca_eval.vs_{versus}.win_rate"][_require(record, "generator", path)] = alpaca_item_scores(path)
    for path in mt_bench_paths:
        items["mt_bench.overall"][_require(read_json(path), "model", path)] = mt_bench_item_scores(path)
    for path in nll_paths:
        items["nll.nll"][_require(read_json(path), "model", path)] = nll_item_scores(path)
    return dict(items)


def comparison_order(first: str, second: str) -> tuple[str, str]:
    """(student, versus) for a pair of students: the untrained student, then a Self-Instruct
    student, is the one compared against; otherwise the earlier in the table's order."""
    for is_versus in (lambda s: s == "base", lambda s: s.startswith("self_instruct-")):
        if is_versus(first) != is_versus(second):
            return (second, first) if is_versus(first) else (first, second)
    return (second, first) if student_order(first) <= student_order(second) else (first, second)


def paired_differences(items: dict[str, dict[str, ItemScores]], seed: int) -> list[dict]:
    """Every student-vs-student difference on every metric with per-item scores, each bootstrap
    seeded by the config seed and the comparison's names (a rerun gives the same numbers)."""
    differences = []
    for metric, by_student in items.items():
        students = sorted(by_student, key=student_order)
        for i, first in enumerate(students):
            for second in students[i + 1:]:
                student, versus = comparison_order(first, second)
                a, b = by_student[student], by_student[versus]
                weights = (a.weights, b.weights) if a.weights is not None and b.weights is not None else None
                result = paired_difference(a.scores, b.scores, derive_seed(seed, "paired_bootstrap", metric, student,
                                                                           versus),
                                           labels=(str(a.path), str(b.path)), weights=weights)
                differences.append({"metric": metric, "student": student, "versus": versus, **result})
    return differences


def student_intervals(rows: dict[str, dict], items: dict[str, dict[str, ItemScores]], seed: int) -> dict:
    """{(student, column): (low, high)}: the 95% interval drawn as each bar's error bar. Per-item
    metrics: a bootstrap over items (the NLL's from its summary); lm-eval: value +- 1.96 stderr."""
    intervals = {}
    for metric, by_student in items.items():
        for student, item_scores in by_student.items():
            if metric == "nll.nll":
                low, high = rows[student].get("nll.nll_low"), rows[student].get("nll.nll_high")
            else:
                scored = [v for v in item_scores.scores.values() if v is not None]
                if not scored:
                    continue
                interval = bootstrap_interval(scored, derive_seed(seed, "bootstrap", metric, student))
                low, high = interval["low"], interval["high"]
            if low is not None and high is not None:
                intervals[(student, metric)] = (low, high)
    for student, values in rows.items():
        for column, value in values.items():
            stderr = values.get(stderr_column(column))
            if column.startswith("lm_eval.") and isinstance(value, (int, float)) and isinstance(stderr, (int, float)):
                intervals[(student, column)] = (value - Z_95 * stderr, value + Z_95 * stderr)
    return intervals


def stderr_column(column: str) -> str:
    """lm-eval's standard-error column of a metric column: `acc` -> `acc_stderr`,
    `exact_match,strict-match` -> `exact_match_stderr,strict-match`."""
    head, comma, filter_name = column.partition(",")
    return f"{head}_stderr{comma}{filter_name}"


def _columns(rows: dict[str, dict]) -> list[str]:
    seen: dict[str, None] = {}
    for values in rows.values():
        for key in values:
            seen.setdefault(key, None)
    prefix_order = {"alpaca_eval": 0, "mt_bench": 1, "lm_eval": 2, "nll": 3}
    # a stable sort: first-seen order within each benchmark
    return sorted(seen, key=lambda c: prefix_order.get(c.split(".")[0], 4))


def table_columns(columns: list[str]) -> list[str]:
    """The markdown table's columns: an interval's bounds and lm-eval's standard errors are shown
    inside the cell of their metric (table_cell), not as columns of their own (report.csv keeps them)."""
    folded = {stderr_column(c) for c in columns} | {f"{c}_low" for c in columns} | {f"{c}_high" for c in columns}
    return [c for c in columns if c not in folded]


def table_cell(values: dict, column: str) -> str:
    """`value`, `value [low, high]` (a bootstrap interval) or `value ± stderr` (lm-eval's)."""
    text = _fmt(values.get(column))
    low, high, stderr = values.get(f"{column}_low"), values.get(f"{column}_high"), values.get(stderr_column(column))
    if low is not None and high is not None:
        return f"{text} [{_fmt(low)}, {_fmt(high)}]"
    if stderr is not None and column.startswith("lm_eval."):
        return f"{text} ± {_fmt(stderr)}"
    return text


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def read_benchmark(path: str) -> dict:
    """One Snakemake `benchmark:` TSV: the mean wall and CPU seconds and the largest max_rss (MB)
    over its rows (one row per repeat); "NA"/"-" entries (unmeasured) are skipped."""
    with open(path, encoding="utf-8") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    if not table or "s" not in table[0] or "max_rss" not in table[0]:
        raise DataError(f"{path}: not a Snakemake benchmark file (expected columns {', '.join(BENCHMARK_FIELDS)})")

    def numbers(column: str) -> list[float]:
        values = []
        for line_no, row in enumerate(table, start=2):
            text = (row.get(column) or "").strip()
            if text in ("", "-", "NA"):
                continue
            try:
                values.append(float(text))
            except ValueError:
                raise DataError(f"{path}:{line_no}: column {column} is not a number: {text!r}") from None
        return values

    wall, rss, cpu = numbers("s"), numbers("max_rss"), numbers("cpu_time")
    return {"runs": len(table), "wall_s": sum(wall) / len(wall) if wall else None,
            "max_rss_mb": max(rss) if rss else None, "cpu_s": sum(cpu) / len(cpu) if cpu else None}


def _labels(paths: list[str]) -> list[str]:
    """Short distinct labels: each path relative to the deepest directory all of them share, no suffix."""
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].stem]
    common = Path(os.path.commonpath(resolved))
    return [str(p.relative_to(common).with_suffix("")) for p in resolved]


def _round_label(path: str) -> str:
    """`round1/montessori` for results/<run>/round1/montessori/.../loss.json; else the two parent dirs."""
    parts = Path(path).parent.parts
    for index, part in enumerate(parts):
        if re.fullmatch(r"round\d+", part):
            return "/".join(parts[index:])
    return "/".join(parts[-2:])


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_losses(paths: list[str], title: str, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for path in paths:
        history = _require(read_json(path), "history", path)
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".", label=_round_label(path))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def plot_metric_bars(rows: dict[str, dict], students: list[str], out: Path, intervals: dict | None = None) -> bool:
    """One panel per headline metric (no standard errors, counts, interval bounds or per-turn
    scores), with each bar's 95% interval from `intervals` ({(student, column): (low, high)}) as
    its error bar; False if there is no headline metric."""
    import matplotlib.pyplot as plt

    intervals = intervals or {}
    headline = [c for c in _columns(rows)
                if not re.search(r"(stderr|standard_error|n_missing|discrete|position_bias|_low$|_high$|n_items"
                                 r"|dropped_in)", c)
                and c != "mt_bench.turn_1"
                and c != "mt_bench.turn_2"]
    if not headline:
        return False
    fig, axes = plt.subplots(1, len(headline), figsize=(max(4.0, 3.2 * len(headline)), 3.6), squeeze=False)
    for ax, column in zip(axes[0], headline):
        values = [rows[s].get(column) for s in students]
        heights = [v if isinstance(v, (int, float)) and not math.isnan(v) else 0.0 for v in values]
        # distances from the bar's top to the interval's ends; none drawn without an interval. A
        # bootstrap's interval is around its own estimate (MT-Bench: the mean of per-question
        # means), which may sit a little off the bar: clipped at the bar.
        bounds = [intervals.get((s, column), (h, h)) for s, h in zip(students, heights)]
        error = [[max(h - low, 0.0) for h, (low, _) in zip(heights, bounds)],
                 [max(high - h, 0.0) for h, (_, high) in zip(heights, bounds)]]
        ax.bar(range(len(students)), heights, color=[f"C{i}" for i in range(len(students))],
               yerr=error if any((s, column) in intervals for s in students) else None, capsize=3)
        ax.set_xticks(range(len(students)), students, rotation=30, ha="right", fontsize=8)
        ax.set_title(column.replace("lm_eval.", "").replace(".", "\n", 1), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return True


def alpaca_selection_note(selection: dict) -> str:
    """How many AlpacaEval instructions the win rates are over, and why any were left out."""
    note = f"AlpacaEval: {selection['evaluated']} of the set's {selection['in_source']} instructions evaluated"
    if selection.get("excluded_as_reference"):
        note += (f"; {selection['excluded_as_reference']} left out because {selection['reason']}: the teacher "
                 f"was trained to help the student on exactly those, so they cannot measure it")
    return note + "."


# config teacher_optimization other than the paper's dpo_instructions (docs/methods.md): what the
# montessori rows then measure.
TEACHER_OPTIMIZATION_NOTES = {
    "dpo_responses": "the teacher learned by DPO on pairs of its responses to one probing instruction; "
                     "the montessori training set's instructions are the untrained teacher's, its responses "
                     "the optimized teacher's",
    "bootstrap": "the teacher was fine-tuned (SFT, no DPO) on its own helpful instructions, the chosen side of "
                 "the preference pairs",
}


def teacher_optimization_note(value: str) -> str:
    return (f"Teacher optimization: `{value}` (not the paper's DPO on instructions): in the `montessori-*` "
            f"rows {TEACHER_OPTIMIZATION_NOTES[value]}.")


def differences_section(differences: list[dict]) -> list[str]:
    """The markdown lines of the student-vs-student table."""
    lines = ["", "## Differences between students", "",
             (f"Each row: the student's score minus the other's on the same items (AlpacaEval instructions, "
              f"MT-Bench questions, NLL answers), with a {CONFIDENCE:.0%} paired bootstrap percentile interval over "
              f"items; *distinguishable from zero* when the interval excludes zero (n/a with one item). AlpacaEval: "
              f"win-rate points against that reference; MT-Bench: rating points (per-question mean of the judged "
              f"turns); NLL: nats per answer token, lower is better. n: items scored for both."), "",
             "| metric | student | versus | difference | 95% interval | n | distinguishable from zero |",
             "|---|---|---|---|---|---|---|"]
    for d in differences:
        interval = "n/a" if d["low"] is None else f"[{_fmt(d['low'])}, {_fmt(d['high'])}]"
        verdict = {True: "yes", False: "no", None: "n/a"}[d["distinguishable"]]
        lines.append(f"| {d['metric']} | {d['student']} | {d['versus']} | {_fmt(d['difference'])} | {interval} "
                     f"| {d['n']} | {verdict} |")
    return lines


def build_report(settings: dict, out_md: str, out_csv: str, figures: str, alpaca_paths: list[str] = (),
                 mt_bench_paths: list[str] = (), lm_eval_paths: list[str] = (), nll_paths: list[str] = (),
                 influence_histogram_paths: list[str] = (), sft_loss_paths: list[str] = (),
                 dpo_loss_paths: list[str] = (), benchmark_paths: list[str] = (),
                 alpaca_selection: str | None = None, analysis_figure_paths: list[str] = ()) -> None:
    """Stage `report`: report.md, report.csv and figures/*.png for the run, with links to the
    analysis figures.

    settings: {"run": run name, "seed": the config seed (seeds every bootstrap), "judge": the
               evaluation judge section (named in the report), "alpaca_eval": {"reference": one or a list},
               "teacher_optimization": config teacher_optimization, absent for the paper's}
    """
    import matplotlib

    matplotlib.use("Agg")
    rows = collect_metrics(list(alpaca_paths), list(mt_bench_paths), list(lm_eval_paths), list(nll_paths))
    if not rows:
        raise DataError("report: no evaluation results were given (alpaca_paths, mt_bench_paths, lm_eval_paths, "
                        "nll_paths)")
    students = sorted(rows, key=student_order)
    columns = _columns(rows)
    seed = int(settings.get("seed", 0))
    items = collect_item_scores(list(alpaca_paths), list(mt_bench_paths), list(nll_paths))
    differences = paired_differences(items, seed)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", *columns])
    for student in students:
        writer.writerow([student, *("" if rows[student].get(c) is None else rows[student].get(c) for c in columns)])
    write_text_atomic(out_csv, buffer.getvalue())

    figures_dir = Path(figures)
    figures_dir.mkdir(parents=True, exist_ok=True)
    figure_lines = []

    def link(title: str, name: str) -> None:
        figure_lines.append(f"![{title}]({os.path.relpath(figures_dir / name, Path(out_md).parent)})")

    if plot_metric_bars(rows, students, figures_dir / "metrics.png", student_intervals(rows, items, seed)):
        link("metrics", "metrics.png")
    for kind, paths in (("sft", sft_loss_paths), ("dpo", dpo_loss_paths)):
        if paths:
            title = "student SFT loss" if kind == "sft" else "teacher DPO loss"
            plot_losses(list(paths), title, figures_dir / f"{kind}_loss.png")
            link(title, f"{kind}_loss.png")
    for path in influence_histogram_paths:
        name = "influence_" + _round_label(path).removesuffix("/influence").replace("/", "_") + ".png"
        with atomic_path(figures_dir / name) as tmp:
            shutil.copyfile(path, tmp)
        link(f"influence {_round_label(path)}", name)
    # drawn by the analysis_figures stage (figures.py): linked where they lie
    for path in analysis_figure_paths:
        figure_lines.append(f"![{Path(path).stem}]({os.path.relpath(path, Path(out_md).parent)})")

    run = settings.get("run", "run")
    judge = settings.get("judge", {})
    lines = [f"# Montessori-Instruct results: {run}", ""]
    references = settings.get("alpaca_eval", {}).get("reference", "dataset")
    references = [references] if isinstance(references, str) else references
    lines.append(f"Judge: {judge.get('type', 'local')} `{judge.get('model')}`; AlpacaEval references: "
                 f"{', '.join(f'`{r}`' for r in references)} (columns `alpaca_eval.vs_<reference>`; a method's "
                 f"own student draws with itself, 50% by definition). Win rates in percent; "
                 f"`length_controlled_winrate` is AlpacaEval 2's length_controlled_v1, `length_controlled_minimal` "
                 f"its GLM without instruction difficulty and gamed baselines (their files were not given); "
                 f"position_bias_first_rate: how often the judge prefers the output shown first, over a sample "
                 f"judged in both orders (0.5 = no bias). MT-Bench scores 1-10 (a local judge's expected rating; "
                 f"n_missing: judgements without a rating); lm-eval metrics in [0, 1], `± stderr` lm-eval's standard "
                 f"error. NLL: the student's mean negative log-likelihood per answer token of held-out strong answers "
                 f"(judge-free; lower is better) with its {CONFIDENCE:.0%} bootstrap interval over items in brackets; "
                 f"dropped_in_*: items left out because their instruction is in the seed pool or the reference set. "
                 f"Error bars in the metrics figure: {CONFIDENCE:.0%} intervals (a bootstrap over items; lm-eval: "
                 f"±1.96 stderr; AlpacaEval: over the win rate's per-instruction preferences).")
    if settings.get("teacher_optimization"):
        lines += ["", teacher_optimization_note(settings["teacher_optimization"])]
    if alpaca_selection:
        lines += ["", alpaca_selection_note(read_json(alpaca_selection))]
    shown = table_columns(columns)
    lines += ["", "## Results", "", "| student | " + " | ".join(shown) + " |",
              "|---" * (len(shown) + 1) + "|"]
    for student in students:
        lines.append(f"| {student} | " + " | ".join(table_cell(rows[student], c) for c in shown) + " |")
    if differences:
        lines += differences_section(differences)

    if benchmark_paths:
        lines += ["", "## Cost per stage", "",
                  ("Wall seconds and peak resident memory from each rule's `benchmark:` file "
                   "(mean over repeats; memory in MB as Snakemake measures it)."), "",
                  "| stage | wall s | peak RSS MB | CPU s |", "|---|---|---|---|"]
        total_wall = 0.0
        for label, path in zip(_labels(list(benchmark_paths)), benchmark_paths):
            cost = read_benchmark(path)
            total_wall += cost["wall_s"] or 0.0
            lines.append(f"| {label} | {_fmt(cost['wall_s'])} | {_fmt(cost['max_rss_mb'])} | {_fmt(cost['cpu_s'])} |")
        lines.append(f"| **total** | {_fmt(total_wall)} | | |")
    if figure_lines:
        lines += ["", "## Figures", "", *figure_lines]
    write_text_atomic(out_md, "\n".join(lines) + "\n")
    log.info("report: %d students x %d metrics -> %s, %s", len(students), len(columns), out_md, out_csv)
