"""The report on fake but well-formed evaluation, training and benchmark files."""

import csv
import json

import pytest

from montessori.errors import DataError
from montessori.report import build_report, read_benchmark

BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def run_dir(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = tmp_path / "results" / "demo"
    students = {"self_instruct-round1": 1.0, "base": 0.0, "montessori-round1": 2.0}
    files = {"alpaca": [], "mt": [], "lm": [], "nll": []}
    instructions = [f"instruction {i}" for i in range(8)]
    for name, bonus in students.items():
        # per-item files beside the summaries: vs the dataset, base loses every comparison, the
        # Self-Instruct student wins instructions 0-3 and montessori 0-5 (one judged draw among them)
        wins = {0: 0, 1: 4, 2: 6}[int(bonus)]
        _write(R / "eval" / name / "alpaca_eval" / "vs-dataset" / "annotations.json", [
            {"instruction": text, "preference": (1.5 if i == 0 and wins else 2.0) if i < wins else 1.0}
            for i, text in enumerate(instructions)])
        _write(R / "eval" / name / "alpaca_eval" / "vs-self_instruct" / "annotations.json", [
            {"instruction": text, "preference": 1.5 if name.startswith("self_instruct") else None if i == 7 else
             (2.0 if i < 2 + 2 * bonus else 1.0)} for i, text in enumerate(instructions)])
        judgments = R / "eval" / name / "mt_bench" / "judgment.jsonl"
        judgments.parent.mkdir(parents=True, exist_ok=True)
        judgments.write_text("".join(json.dumps({"question_id": 81 + q, "turn": turn, "model": name,
                                                 "score": 3 + bonus + q % 3 if turn == 1 else -1}) + "\n"
                                     for q in range(6) for turn in (1, 2)))
        # NLL: every item's loss is base's minus 0.1 x bonus: a constant difference
        items = R / "eval" / name / "nll" / "items.jsonl"
        items.parent.mkdir(parents=True, exist_ok=True)
        items.write_text("".join(json.dumps({"id": f"nll-{i:03d}", "tokens": 10 + i, "nll": 2.0 + 0.1 * i - 0.1 * bonus})
                                 + "\n" for i in range(5)))
        files["nll"].append(_write(R / "eval" / name / "nll" / "summary.json", {
            "model": name, "nll": 2.2 - 0.1 * bonus, "nll_low": 2.0 - 0.1 * bonus, "nll_high": 2.4 - 0.1 * bonus,
            "n_items": 5, "dropped_in_seed_pool": 0, "dropped_in_reference": 1, "items": "items.jsonl"}))
        files["alpaca"].append(_write(R / "eval" / name / "alpaca_eval" / "vs-dataset" / "metrics.json", {
            "win_rate": 10 + bonus, "standard_error": 1.5, "n_wins": 1, "n_wins_base": 7, "n_draws": 0,
            "n_total": 8, "discrete_win_rate": 12.5, "length_controlled_winrate": 20 + bonus, "n_missing": 0,
            "length_control": "length_controlled_v1", "position_bias_first_rate": 0.75,
            "generator": name, "reference": "dataset", "reference_generator": "gpt4_1106_preview"}))
        versus_self_instruct = 50.0 if name.startswith("self_instruct") else 40 + 10 * bonus
        files["alpaca"].append(_write(R / "eval" / name / "alpaca_eval" / "vs-self_instruct" / "metrics.json", {
            "win_rate": versus_self_instruct, "standard_error": 2.0, "n_total": 8, "discrete_win_rate": 50.0,
            "length_controlled_minimal": versus_self_instruct, "length_control": "length_controlled_minimal",
            "n_missing": 0, "generator": name, "reference": "self_instruct",
            "reference_generator": "self_instruct-round1"}))
        files["mt"].append(_write(R / "eval" / name / "mt_bench" / "scores.json", {
            "model": name, "turn_1": 3 + bonus, "turn_2": None, "overall": 3 + bonus, "n_missing": 5}))
        files["lm"].append(_write(R / "eval" / name / "lm_eval" / "results.json", {
            "model": name, "tasks": {"montessori_local_qa": {"num_fewshot": 0, "n_samples": 5,
                                                             "metrics": {"acc": 0.2 * (1 + bonus), "acc_stderr": 0.1}}}}))
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    sft = [_write(R / "round1" / m / "loss.json", {"stage": "sft", "history": history}) for m in ("montessori", "self_instruct")]
    dpo = [_write(R / "round1" / "teacher" / "loss.json", {"stage": "dpo", "history": history})]
    histogram = R / "round1" / "influence" / "histogram.png"
    histogram.parent.mkdir(parents=True)
    fig, ax = plt.subplots()
    ax.hist([0.1, -0.2, 0.3])
    fig.savefig(histogram)
    plt.close(fig)
    bench = []
    for stage, (seconds, rss) in {"warmup": ((10.0, 14.0), (900.5, 950.0)), "influence.shard-0": ((30.0,), ("-",))}.items():
        path = R / "benchmarks" / f"{stage}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{s}\t0:00:{int(s):02d}\t{r}\t1\t1\t1\t0\t0\t50\t{s / 2}\n" for s, r in zip(seconds, rss))
        path.write_text(BENCH_HEADER + rows)
        bench.append(str(path))
    return R, files, sft, dpo, [str(histogram)], bench


SETTINGS = {"run": "demo", "seed": 42, "judge": {"type": "local", "model": "smollm2-135m-instruct"},
            "alpaca_eval": {"reference": ["dataset", "method:self_instruct"]}}


def _build(R, files, **extra):
    build_report(SETTINGS, str(R / "report.md"), str(R / "report.csv"), str(R / "figures"),
                 alpaca_paths=files["alpaca"], mt_bench_paths=files["mt"], lm_eval_paths=files["lm"],
                 nll_paths=files["nll"], **extra)


def test_report_table_figures_and_costs(run_dir):
    R, files, sft, dpo, histograms, bench = run_dir
    _build(R, files, influence_histogram_paths=histograms, sft_loss_paths=sft, dpo_loss_paths=dpo,
           benchmark_paths=bench, analysis_figure_paths=[str(R / "analysis" / "helpful_share.png")])

    with open(R / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["student"] for row in table] == ["base", "montessori-round1", "self_instruct-round1"]
    assert float(table[1]["alpaca_eval.vs_dataset.win_rate"]) == 12.0
    assert float(table[1]["alpaca_eval.vs_dataset.length_controlled_winrate"]) == 22.0
    assert float(table[1]["alpaca_eval.vs_dataset.position_bias_first_rate"]) == 0.75
    # the paper's Table 1: against the Self-Instruct student, which is 50% against itself
    assert float(table[1]["alpaca_eval.vs_self_instruct.win_rate"]) == 60.0
    assert float(table[2]["alpaca_eval.vs_self_instruct.win_rate"]) == 50.0
    # a minimal length control is never shown under the full name
    assert float(table[0]["alpaca_eval.vs_self_instruct.length_controlled_minimal"]) == 40.0
    assert "alpaca_eval.vs_self_instruct.length_controlled_winrate" not in table[0]
    assert float(table[2]["mt_bench.overall"]) == 4.0
    assert table[0]["mt_bench.turn_2"] == ""
    assert float(table[1]["lm_eval.montessori_local_qa.acc"]) == pytest.approx(0.6)
    assert list(table[0])[1] == "alpaca_eval.vs_dataset.win_rate"
    assert float(table[1]["nll.nll"]) == pytest.approx(2.0) and float(table[1]["nll.nll_low"]) == pytest.approx(1.8)
    assert float(table[2]["lm_eval.montessori_local_qa.acc_stderr"]) == 0.1

    report = (R / "report.md").read_text()
    assert "| montessori-round1 | 12.00 |" in report
    assert "`dataset`, `method:self_instruct`" in report
    # lm-eval's standard error beside its accuracy, the NLL's bootstrap interval beside it
    assert "| 0.600 ± 0.100 |" in report and "| 2.00 [1.80, 2.20] |" in report
    # NLL differences are constant per item: zero-width intervals at that value, distinguishable
    assert "| nll.nll | montessori-round1 | base | -0.200 | [-0.200, -0.200] | 5 | yes |" in report
    assert "| nll.nll | self_instruct-round1 | base | -0.100 | [-0.100, -0.100] | 5 | yes |" in report
    assert "| nll.nll | montessori-round1 | self_instruct-round1 | -0.100 | [-0.100, -0.100] | 5 | yes |" in report
    # AlpacaEval vs the dataset, per instruction: montessori (0.5 + 5 wins of 8) minus base (no wins)
    assert "| alpaca_eval.vs_dataset.win_rate | montessori-round1 | base | 68.75 | [" in report
    # vs the Self-Instruct student: instruction 7 has no preference for the others, so 7 items pair
    assert "| alpaca_eval.vs_self_instruct.win_rate | montessori-round1 | self_instruct-round1 | " in report
    assert "| 7 |" in report.split("alpaca_eval.vs_self_instruct.win_rate | montessori-round1 | base")[1].split("\n")[0]
    # MT-Bench: only turn 1 rated; montessori rates 2 points above base on every question
    assert "| mt_bench.overall | montessori-round1 | base | 2.00 | [2.00, 2.00] | 6 | yes |" in report
    assert "distinguishable from zero" in report
    # mean wall of the two warm-up repeats, their peak RSS; an unmeasured RSS shows as n/a
    assert "| warmup | 12.00 | 950.00 | 6.00 |" in report
    assert "| influence.shard-0 | 30.00 | n/a | 15.00 |" in report
    assert "| **total** | 42.00 |" in report
    for name in ("metrics.png", "sft_loss.png", "dpo_loss.png", "influence_round1.png"):
        assert (R / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](figures/{name})" in report
    # the analysis figures stay where their stage drew them
    assert "![helpful_share](analysis/helpful_share.png)" in report


def test_report_statistics_are_the_same_on_a_rerun(run_dir):
    R, files, *_ = run_dir
    _build(R, files)
    first = (R / "report.md").read_text()
    _build(R, files)
    assert (R / "report.md").read_text() == first
    # the AlpacaEval intervals are not degenerate: the bootstrap did resample
    row = next(line for line in first.splitlines()
               if line.startswith("| alpaca_eval.vs_dataset.win_rate | montessori-round1 | base |"))
    low, high = (float(x) for x in row.split("[")[1].split("]")[0].split(","))
    assert low < 68.75 < high


def test_report_names_both_files_when_students_scored_different_items(run_dir):
    R, files, *_ = run_dir
    items = R / "eval" / "base" / "nll" / "items.jsonl"
    items.write_text(items.read_text().replace("nll-004", "nll-999"))
    with pytest.raises(DataError, match=r"montessori-round1/nll/items.jsonl and .*base/nll/items.jsonl: the item ids "
                                        r"differ"):
        _build(R, files)


def test_report_rejects_a_bad_benchmark_file(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("seconds\n1\n")
    with pytest.raises(DataError, match="not a Snakemake benchmark file"):
        read_benchmark(str(bad))
    bad.write_text(BENCH_HEADER + "fast\t0\t1\t1\t1\t1\t0\t0\t0\t1\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: column s is not a number"):
        read_benchmark(str(bad))


def test_report_needs_results(tmp_path):
    with pytest.raises(DataError, match="no evaluation results"):
        build_report({}, str(tmp_path / "r.md"), str(tmp_path / "r.csv"), str(tmp_path / "fig"))


def test_report_says_how_many_alpaca_instructions_were_left_out_and_why():
    from montessori.report import alpaca_selection_note

    note = alpaca_selection_note({"in_source": 805, "excluded_as_reference": 256, "evaluated": 549,
                                  "reason": "the influence reference set holds these instructions"})
    assert note.startswith("AlpacaEval: 549 of the set's 805 instructions evaluated; 256 left out because the "
                           "influence reference set holds these instructions")
    assert alpaca_selection_note({"in_source": 4, "excluded_as_reference": 0, "evaluated": 4}) == \
        "AlpacaEval: 4 of the set's 4 instructions evaluated."
