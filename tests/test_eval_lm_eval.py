"""lm-eval-harness through its Python API on the project's local task definitions."""

import json
from pathlib import Path

import pytest

from montessori.errors import DataError
from montessori.evaluation.lm_eval import local_task_files, make_task_manager, parse_results, run_lm_eval
from montessori.models import write_model_card

ROOT = Path(__file__).resolve().parents[1]


def test_parse_results_keeps_metrics_and_filters():
    results = {"results": {"task_a": {"alias": "task_a", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                      "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}},
               "n-samples": {"task_a": {"original": 100, "effective": 4}}}
    parsed = parse_results(results, {"task_a": 3})
    assert parsed == {"task_a": {"num_fewshot": 3, "n_samples": 4,
                                 "metrics": {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict-match": 0.25}}}


def test_lm_eval_indexes_its_own_tasks_only_when_a_configured_task_is_not_local():
    include_path = str(ROOT / "data" / "eval" / "lm_eval")
    local = local_task_files(include_path)
    only_local = make_task_manager(include_path, ["montessori_local_qa"], local)
    assert set(only_local.all_tasks) == {"montessori_local_qa", "montessori_gsm8k_local"}
    with_registry = make_task_manager(include_path, ["montessori_local_qa", "gsm8k"], local)
    assert {"montessori_local_qa", "gsm8k", "hellaswag"} <= set(with_registry.all_tasks)


def test_missing_local_data_is_named(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        "task: local_missing\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n")
    card = tmp_path / "card.json"
    write_model_card(card, tiny_model_dir)
    settings = {"lm_eval": {"include_path": "tasks", "tasks": [{"name": "local_missing"}]}}
    with pytest.raises(DataError, match="t.yaml: task 'local_missing' reads nowhere.jsonl"):
        run_lm_eval(settings, str(card), str(tmp_path / "out.json"), "base")


def test_local_tasks_end_to_end(tmp_path, tiny_model_dir, shared_data, monkeypatch):
    """The embedded multiple-choice task and GSM8K on the real test file, a few items each."""
    monkeypatch.chdir(ROOT)
    card = tmp_path / "card.json"
    write_model_card(card, tiny_model_dir)
    out = tmp_path / "lm_eval.json"
    settings = {"seed": 42, "backend": "transformers",
                "lm_eval": {"include_path": "data/eval/lm_eval", "limit": 2, "batch_size": 2,
                            "tasks": [{"name": "montessori_local_qa", "num_fewshot": 0},
                                      {"name": "montessori_gsm8k_local", "num_fewshot": 1}]}}
    run_lm_eval(settings, str(card), str(out), "base")
    result = json.loads(out.read_text())
    assert result["model"] == "base" and result["backend"] == "hf"
    qa = result["tasks"]["montessori_local_qa"]
    assert qa["num_fewshot"] == 0 and qa["n_samples"] == 2
    assert {"acc", "acc_stderr", "acc_norm"} <= set(qa["metrics"])
    assert qa["metrics"]["acc"] in (0.0, 0.5, 1.0)
    gsm = result["tasks"]["montessori_gsm8k_local"]
    assert gsm["num_fewshot"] == 1 and gsm["n_samples"] == 2
    assert gsm["metrics"]["exact_match,strict-match"] in (0.0, 0.5, 1.0)
    assert "exact_match,flexible-extract" in gsm["metrics"]
