import copy
from pathlib import Path

import pytest
import yaml

from montessori.config import deep_merge, load_config, validate_config
from montessori.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def shipped():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_shipped_config_and_presets_validate():
    config = load_config(ROOT / "config.yaml")
    assert config["models"]["teacher"] == "smollm2-135m-instruct"
    for preset in sorted((ROOT / "presets").glob("*.yaml")):
        load_config(ROOT / "config.yaml", preset)


def test_defaults_fill_missing_sections():
    config = validate_config({})
    assert config["dpo"]["beta"] == 0.1
    assert config["dpo"]["lr"] == 1e-6
    assert config["sft"]["schedule"] == {"warmup": 0.1, "stable": 0.5, "decay": 0.4, "min_lr_ratio": 0.001}
    assert config["synthesis"]["n"] == 4
    assert config["synthesis"]["filters"]["rouge_threshold"] == 0.7
    assert config["evaluation"]["nll"] == {"source": "data/eval/nll.jsonl", "split": "train", "limit": None,
                                           "max_length": 1024, "batch_size": 8}


@pytest.mark.parametrize(
    "override, key",
    [
        ({"bogus": 1}, "'bogus'"),
        ({"synthesis": {"nn": 4}}, "'synthesis.nn'"),
        ({"synthesis": {"n": "four"}}, "'synthesis.n'"),
        ({"influence": {"mode": "fast"}}, "'influence.mode'"),
        ({"dpo": {"lr": -1}}, "'dpo.lr'"),
        ({"methods": ["montessori", "magic"]}, "'methods.1'"),
        ({"sft": {"schedule": {"warmup": 0.3}}}, "'sft.schedule'"),
        ({"influence": {"shards": 64}}, "'influence.shards'"),
        ({"influence": {"gpus_per_shard": 2}, "compute": {"gpus": 0}}, "'influence.gpus_per_shard'"),
        ({"methods": ["montessori", "self_instruct_api"]}, "'external_teacher'"),
        ({"evaluation": {"alpaca_eval": {"reference": "method:self_instruct"}}, "methods": ["montessori"]},
         "'evaluation.alpaca_eval.reference'"),
        ({"evaluation": {"alpaca_eval": {"reference": ["dataset", "method:magic"]}}},
         "'evaluation.alpaca_eval.reference'"),
        ({"evaluation": {"alpaca_eval": {"reference": ["dataset", "dataset"]}}}, "'evaluation.alpaca_eval.reference'"),
        ({"evaluation": {"alpaca_eval": {"reference": []}}}, "'evaluation.alpaca_eval.reference'"),
        ({"influence": {"reference": {"kind": "paper"}}}, "'influence.reference.allow_eval_contamination'"),
        ({"influence": {"reference": {"kind": "original"}}}, "'influence.reference.kind'"),
        ({"pairs": {"signal": "vibes"}}, "'pairs.signal'"),
        ({"pairs": {"signal": "judge", "rule": "sign"}}, "'pairs.rule'"),
        ({"pairs": {"signal": "loss", "rule": "momentum"}}, "'pairs.rule'"),
        ({"seed_pool": {"fields": {"output": "text"}}}, "'seed_pool.fields.output'"),
        ({"transfer_students": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}, "'transfer_students'"),
        ({"transfer_students": [{"name": "has-dash", "model": "x"}]}, "'transfer_students.0.name'"),
        ({"transfer_students": [{"name": "nomodel"}]}, "'transfer_students.0'"),
        ({"evaluation": {"nll": {"max_length": 8}}}, "'evaluation.nll.max_length'"),
        ({"evaluation": {"nll": {"limit": 0}}}, "'evaluation.nll.limit'"),
        ({"logging": {"report_to": "mlflow"}}, "'logging.report_to'"),
    ],
)
def test_bad_values_name_the_key(shipped, override, key):
    config = deep_merge(copy.deepcopy(shipped), override)
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert f"config key {key}" in str(err.value)


def test_load_config_merges_files_in_order(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("models:\n  student: HuggingFaceTB/SmolLM2-360M\n")
    config = load_config(ROOT / "config.yaml", override)
    assert config["models"]["student"] == "HuggingFaceTB/SmolLM2-360M"
    assert config["models"]["teacher"] == "smollm2-135m-instruct"


def test_load_config_reports_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
