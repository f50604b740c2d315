"""AlpacaEval 2 metrics on preferences whose win rates are worked out by hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from montessori.evaluation.metrics import (
    alpaca_eval_metrics,
    length_controlled_winrate,
    win_rate_metrics,
)

ROOT = Path(__file__).resolve().parents[1]


def test_win_rate_counts_and_standard_error_by_hand():
    # kept (preference - 1): 0, 1, .5, .5 (legacy 0 = draw), .2, .8; None is dropped
    metrics = win_rate_metrics([1, 2, 1.5, 0, None, 1.2, 1.8])
    assert metrics["win_rate"] == pytest.approx(50.0)
    # squared deviations .25+.25+0+0+.09+.09 = .68; sd = sqrt(.68/5); se = sd/sqrt(6)
    assert metrics["standard_error"] == pytest.approx(100 * math.sqrt(0.68 / 5) / math.sqrt(6))
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"], metrics["n_total"]) == (2, 2, 2, 6)


def test_discrete_win_rate_rounds_weighted_preferences():
    metrics = win_rate_metrics([1.3, 1.3, 1.6])
    assert metrics["win_rate"] == pytest.approx(40.0)          # (.3 + .3 + .6) / 3
    assert metrics["discrete_win_rate"] == pytest.approx(100 / 3)  # 1, 1, 2


def test_out_of_range_preferences_are_dropped():
    metrics = win_rate_metrics([2.0, 2.5, float("nan"), 1.0])
    assert metrics["n_total"] == 2 and metrics["win_rate"] == pytest.approx(50.0)


def _two_groups(size):
    # model longer in the first group (wins with p .9), shorter in the second (p .5)
    preferences = [1.9] * size + [1.5] * size
    reference_lengths = [100] * size + [200] * size
    model_lengths = [200] * size + [100] * size
    return preferences, reference_lengths, model_lengths


def test_length_controlled_winrate_removes_the_length_term():
    # Two groups at tanh(+-t): sigma(w0 + w1 t) = .5, sigma(w0 - w1 t) = .9, so the length-free
    # prediction is sigma(w0) with w0 = (logit .9 + logit .5) / 2 = ln(9) / 2: 75 %, raw 70 %.
    preferences, ref, model = _two_groups(5)
    expected = 100 / (1 + math.exp(-math.log(9) / 2))
    assert win_rate_metrics(preferences)["win_rate"] == pytest.approx(70.0)
    assert length_controlled_winrate(preferences, ref, model) == pytest.approx(expected, abs=0.05)


def test_length_controlled_winrate_without_cross_validation_for_few_rows():
    preferences, ref, model = _two_groups(2)
    expected = 100 / (1 + math.exp(-math.log(9) / 2))
    # alpaca_eval's fallback (C=100, L1) shrinks the fit a little on four rows
    assert length_controlled_winrate(preferences, ref, model) == pytest.approx(expected, abs=1.0)


def test_length_controlled_winrate_of_the_baseline_against_itself_is_50():
    rows = [{"output_1": "a" * n, "output_2": "b" * (2 * n), "preference": 1.8,
             "generator_1": "ref", "generator_2": "ref"} for n in range(1, 8)]
    assert alpaca_eval_metrics(rows)["length_controlled_minimal"] == 50.0


def test_length_controlled_winrate_with_difficulty_and_gamed_baselines():
    preferences, ref, model = _two_groups(5)
    difficulty = [0.0] * 10
    # The model's own fit: w1 * tanh(+-z) = -+ ln(9) / 2 with z = 100 / std(+-100) (ddof 1). Gamed
    # rows (no model term) that follow the same length slope leave the joint fit, and so the
    # length-controlled win rate, where the model's rows alone put it.
    z = 100 / (100 * math.sqrt(10 / 9))
    p_shorter = 1 / (1 + math.exp(math.log(9) / 2))
    gamed = pd.DataFrame({"index": range(6), "preference": [p_shorter] * 3 + [1 - p_shorter] * 3,
                          "std_delta_len": [z] * 3 + [-z] * 3, "instruction_difficulty": [0.0] * 6,
                          "not_gamed_baseline": [False] * 6})
    expected = 100 / (1 + math.exp(-math.log(9) / 2))
    plain = length_controlled_winrate(preferences, ref, model, instruction_difficulty=difficulty)
    regularized = length_controlled_winrate(preferences, ref, model, instruction_difficulty=difficulty, gamed=gamed)
    assert plain == pytest.approx(expected, abs=0.05)
    assert regularized == pytest.approx(expected, abs=0.05)
    # gamed rows with a steeper slope than the model's change the fit
    steeper = gamed.assign(preference=[0.05] * 3 + [0.95] * 3)
    moved = length_controlled_winrate(preferences, ref, model, instruction_difficulty=difficulty, gamed=steeper)
    assert abs(moved - expected) > 0.1
    with pytest.raises(ValueError):
        length_controlled_winrate(preferences, ref, model, gamed=gamed)


def _write_annotations(path, preferences):
    rows = []
    for i, preference in enumerate(preferences):
        rows.append({"instruction": f"q{i}", "output_1": "r" * (10 + i), "generator_1": "gpt4_1106_preview",
                     "output_2": "m" * (20 - i), "generator_2": "student", "preference": preference})
    path.write_text(json.dumps(rows))


def test_script_prints_every_leaderboard_field(tmp_path):
    annotations = tmp_path / "annotations.json"
    _write_annotations(annotations, [1, 2, 1.5, 0, None, 1.2, 1.8])
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "alpaca_eval_metrics.py"), str(annotations)],
                          capture_output=True, text=True, check=True)
    printed = json.loads(done.stdout)
    assert set(printed) == {"win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total",
                            "discrete_win_rate", "length_control", "length_controlled_minimal"}
    assert printed["win_rate"] == pytest.approx(50.0)
    assert printed["standard_error"] == pytest.approx(100 * math.sqrt(0.68 / 5) / math.sqrt(6))
    assert (printed["n_wins"], printed["n_wins_base"], printed["n_draws"], printed["n_total"]) == (2, 2, 2, 6)
    assert printed["discrete_win_rate"] == pytest.approx(50.0)
    assert 0 < printed["length_controlled_minimal"] < 100 and printed["length_control"] == "length_controlled_minimal"


def test_script_rejects_annotations_without_preference(tmp_path):
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps([{"output_1": "a", "output_2": "b"}]))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "alpaca_eval_metrics.py"), str(annotations)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "annotation 0 has no 'preference'" in done.stderr


def _synthetic_alpaca_eval_files(tmp_path, n_rows, rng):
    """instruction_difficulty.csv and df_gamed.csv in alpaca_eval's layout, made up for the test."""
    difficulty = rng.normal(0, 1, n_rows)
    pd.DataFrame({"instruction_difficulty": difficulty}).to_csv(tmp_path / "instruction_difficulty.csv")
    gamed = []
    for model, shift in (("gamed_verbose", 1.0), ("gamed_concise", -1.0)):
        for i in range(n_rows):
            length = rng.normal(shift, 0.3)
            gamed.append({"index": i, "preference": float(1 / (1 + math.exp(-(length + difficulty[i])))),
                          "std_delta_len": length, "instruction_difficulty": difficulty[i],
                          "not_gamed_baseline": False, "model": model})
    pd.DataFrame(gamed).to_csv(tmp_path / "df_gamed.csv", index=False)
    return difficulty


@pytest.mark.parametrize("glm_name", ["length_controlled_v1", "length_controlled_minimal"])
def test_both_length_controls_match_alpaca_eval(tmp_path, monkeypatch, glm_name):
    """Our GLM against alpaca_eval's own `get_length_controlled_winrate`, its hub files replaced by
    synthetic ones: the full model under the leaderboard's name, the minimal one under its own."""
    import numpy as np

    from montessori.evaluation.alpaca_eval import difficulties_at, load_length_control

    glm_winrate = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda filename, **kwargs: str(tmp_path / filename))
    rng = np.random.default_rng(0)
    n = 40
    _synthetic_alpaca_eval_files(tmp_path, n, rng)
    annotations = []
    for i in range(n):
        reference_length, model_length = int(rng.integers(50, 400)), int(rng.integers(50, 400))
        p_model = 1 / (1 + math.exp(-(model_length - reference_length) / 150 - 0.3))
        annotations.append({"instruction": f"q{i}", "output_1": "r" * reference_length, "output_2": "m" * model_length,
                            "generator_1": "reference", "generator_2": "student", "annotator": "judge",
                            "preference": 1 + p_model})
    theirs = glm_winrate.get_length_controlled_winrate(pd.DataFrame(annotations), glm_name=glm_name,
                                                       save_weights_dir=None)["length_controlled_winrate"]
    if glm_name == "length_controlled_v1":
        by_index, gamed = load_length_control(str(tmp_path / "instruction_difficulty.csv"), str(tmp_path / "df_gamed.csv"))
        difficulty = difficulties_at(by_index, list(range(n)), "instruction_difficulty.csv")
        ours = alpaca_eval_metrics(annotations, instruction_difficulty=difficulty, gamed=gamed)
        assert ours["length_control"] == glm_name and "length_controlled_minimal" not in ours
        assert ours["length_controlled_winrate"] == pytest.approx(theirs, abs=1e-6)
    else:
        ours = alpaca_eval_metrics(annotations)
        assert ours["length_control"] == glm_name and "length_controlled_winrate" not in ours
        assert ours["length_controlled_minimal"] == pytest.approx(theirs, abs=1e-6)
    with pytest.raises(ValueError, match="needs both"):
        alpaca_eval_metrics(annotations, instruction_difficulty=[0.0] * n)


def test_script_computes_length_controlled_v1_from_the_files(tmp_path):
    import numpy as np

    _synthetic_alpaca_eval_files(tmp_path, 12, np.random.default_rng(1))
    annotations = tmp_path / "annotations.json"
    _write_annotations(annotations, [1.2, 1.9, 1.4, 1.7, 1.1, 1.8, 1.3, 1.6, 1.5, 1.25, 1.75, 1.05])
    command = [sys.executable, str(ROOT / "scripts" / "alpaca_eval_metrics.py"), str(annotations),
               "--instruction-difficulty", str(tmp_path / "instruction_difficulty.csv")]
    alone = subprocess.run(command, capture_output=True, text=True, check=False)
    assert alone.returncode == 2 and "needs both" in alone.stderr
    done = subprocess.run(command + ["--gamed", str(tmp_path / "df_gamed.csv")], capture_output=True, text=True,
                          check=True)
    printed = json.loads(done.stdout)
    assert printed["length_control"] == "length_controlled_v1" and "length_controlled_minimal" not in printed
    assert 0 < printed["length_controlled_winrate"] < 100


def test_win_points_are_the_per_instruction_terms_of_the_win_rate():
    from montessori.evaluation.metrics import win_points

    preferences = [1, 2, 1.5, 0, None, 1.2, 1.8, 2.5, float("nan")]
    points = [win_points(p) for p in preferences]
    assert points[:4] == [0.0, 100.0, 50.0, 50.0]  # the legacy 0 is a draw
    assert points[4] is None and points[7] is None and points[8] is None
    kept = [p for p in points if p is not None]
    assert sum(kept) / len(kept) == pytest.approx(win_rate_metrics(preferences)["win_rate"])
