"""The run's report: one results table (students x metrics), plots, and what each stage cost.

Every evaluation file names its student inside it (`generator` of the AlpacaEval metrics,
`model` of the MT-Bench scores and of the lm-eval results), so the inputs are plain lists of
files in any order. Rows are students: `base`, then `<method>-round<k>` by round and method.
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
from .io import atomic_path, read_json, write_text_atomic

log = logging.getLogger(__name__)

# length_controlled_winrate is AlpacaEval 2's length_controlled_v1; without its files the metrics
# hold length_controlled_minimal instead, and the table shows whichever was computed.
ALPACA_COLUMNS = ("win_rate", "standard_error", "discrete_win_rate", "length_controlled_winrate",
                  "length_controlled_minimal", "n_missing", "position_bias_first_rate", "position_bias_consistency")
MT_BENCH_COLUMNS = ("turn_1", "turn_2", "overall", "n_missing")
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


def collect_metrics(alpaca_paths: list[str], mt_bench_paths: list[str], lm_eval_paths: list[str]) -> dict[str, dict]:
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
    return dict(rows)


def _columns(rows: dict[str, dict]) -> list[str]:
    seen: dict[str, None] = {}
    for values in rows.values():
        for key in values:
            seen.setdefault(key, None)
    prefix_order = {"alpaca_eval": 0, "mt_bench": 1, "lm_eval": 2}
    # a stable sort: first-seen order within each benchmark
    return sorted(seen, key=lambda c: prefix_order.get(c.split(".")[0], 3))


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


def plot_metric_bars(rows: dict[str, dict], students: list[str], out: Path) -> bool:
    """One panel per headline metric (no standard errors, counts or per-turn scores); False if none."""
    import matplotlib.pyplot as plt

    headline = [c for c in _columns(rows)
                if not re.search(r"(stderr|standard_error|n_missing|discrete|position_bias)", c)
                and c != "mt_bench.turn_1"
                and c != "mt_bench.turn_2"]
    if not headline:
        return False
    fig, axes = plt.subplots(1, len(headline), figsize=(max(4.0, 3.2 * len(headline)), 3.6), squeeze=False)
    for ax, column in zip(axes[0], headline):
        values = [rows[s].get(column) for s in students]
        heights = [v if isinstance(v, (int, float)) and not math.isnan(v) else 0.0 for v in values]
        ax.bar(range(len(students)), heights, color=[f"C{i}" for i in range(len(students))])
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


def build_report(settings: dict, out_md: str, out_csv: str, figures: str, alpaca_paths: list[str] = (),
                 mt_bench_paths: list[str] = (), lm_eval_paths: list[str] = (),
                 influence_histogram_paths: list[str] = (), sft_loss_paths: list[str] = (),
                 dpo_loss_paths: list[str] = (), benchmark_paths: list[str] = (),
                 alpaca_selection: str | None = None, analysis_figure_paths: list[str] = ()) -> None:
    """Stage `report`: report.md, report.csv and figures/*.png for the run, with links to the
    analysis figures.

    settings: {"run": run name, "judge": the evaluation judge section (named in the report),
               "alpaca_eval": {"reference": one or a list}}
    """
    import matplotlib

    matplotlib.use("Agg")
    rows = collect_metrics(list(alpaca_paths), list(mt_bench_paths), list(lm_eval_paths))
    if not rows:
        raise DataError("report: no evaluation results were given (alpaca_paths, mt_bench_paths, lm_eval_paths)")
    students = sorted(rows, key=student_order)
    columns = _columns(rows)

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

    if plot_metric_bars(rows, students, figures_dir / "metrics.png"):
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
                 f"n_missing: judgements without a rating); lm-eval metrics in [0, 1].")
    if alpaca_selection:
        lines += ["", alpaca_selection_note(read_json(alpaca_selection))]
    lines += ["", "## Results", "", "| student | " + " | ".join(columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for student in students:
        lines.append(f"| {student} | " + " | ".join(_fmt(rows[student].get(c)) for c in columns) + " |")

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
