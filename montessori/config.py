"""Config loading and validation: the JSON schema, defaults filled in, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from .errors import ConfigError
from .evaluation.judges import judge_type
from .pairs import check_signal_rule
from .teacheropt import check_teacher_optimization

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def _with_defaults(validator_class):
    """A validator that fills `default` values into objects as it validates them."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    default = subschema["default"]
                    instance[name] = dict(default) if isinstance(default, dict) else (
                        list(default) if isinstance(default, list) else default)
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _key_of(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return ".".join(filter(None, [path, extra[0] if extra else ""]))
    return path or "<top level>"


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(path.read_text())


def validate_config(config: dict, schema: dict | None = None, source: str = "config") -> dict:
    """Validate in place (defaults filled) and check the rules a schema cannot express."""
    schema = schema or load_schema()
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        lines = [f"config key '{_key_of(e)}': {e.message}" for e in errors[:5]]
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(lines))
    _check_consistency(config, source)
    return config


def _check_consistency(config: dict, source: str) -> None:
    def fail(key: str, message: str):
        raise ConfigError(f"{source}: config key '{key}': {message}")

    synthesis = config["synthesis"]
    if synthesis["generated_examples"] >= synthesis["prompt_examples"]:
        fail("synthesis.generated_examples", "must be smaller than synthesis.prompt_examples")
    for section in ("dpo", "sft"):
        schedule = config[section]["schedule"]
        total = schedule["warmup"] + schedule["stable"] + schedule["decay"]
        if abs(total - 1.0) > 1e-6:
            fail(f"{section}.schedule", f"warmup + stable + decay must be 1, got {total:g}")
    if config["probes"]["probing_size"] < config["influence"]["shards"]:
        fail("influence.shards", f"{config['influence']['shards']} shards but only "
             f"{config['probes']['probing_size']} probing examples (probes.probing_size): some shards would be empty")
    if config["influence"]["gpus_per_shard"] > 1 and config["compute"]["gpus"] == 0:
        fail("influence.gpus_per_shard", "a shard over several GPUs needs compute.gpus >= 1 "
             "(each influence job asks for compute.gpus x gpus_per_shard GPUs)")
    if "self_instruct_api" in config["methods"]:
        teacher = config["external_teacher"]
        if not teacher["base_url"] or not teacher["model"]:
            fail("external_teacher", "method self_instruct_api needs external_teacher.base_url and .model")
    influence_reference = config["influence"]["reference"]
    if influence_reference["kind"] == "paper" and not influence_reference["allow_eval_contamination"]:
        fail("influence.reference.allow_eval_contamination", "kind 'paper' measures influence on AlpacaEval 2 "
             "instructions; set it to true knowingly (the AlpacaEval evaluation then leaves those out)")
    references = config["evaluation"]["alpaca_eval"]["reference"]
    for reference in [references] if isinstance(references, str) else references:
        if reference.startswith("method:") and reference.split(":", 1)[1] not in config["methods"]:
            fail("evaluation.alpaca_eval.reference", f"'{reference}' names a method that is not in 'methods'")
        if reference == "method:self_reward" and config["transfer_students"]:
            fail("evaluation.alpaca_eval.reference", "'method:self_reward' cannot be a transfer student's reference: "
                 "self_reward trains no student by SFT, so no transfer student learns from it (docs/methods.md)")
    names = [student["name"] for student in config["transfer_students"]]
    if len(set(names)) < len(names):
        fail("transfer_students", f"names must differ, got {names}")
    try:
        judge_type(config["evaluation"]["judge"])  # an api judge names its endpoint and model
        check_signal_rule(config["pairs"]["signal"], config["pairs"]["rule"])
        check_teacher_optimization(config["teacher_optimization"], synthesis["n"])
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(*paths: str | Path) -> dict:
    """Load and merge config files (later ones override earlier ones, nested), then validate."""
    merged: dict = {}
    for path in paths:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        merged = deep_merge(merged, data)
    return validate_config(merged, source=", ".join(map(str, paths)))


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
