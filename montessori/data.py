"""Seed pool and reference pairs: a hub dataset name, a remote file URL, or a local .json/.jsonl/.parquet."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from .errors import DataError
from .io import iter_jsonl_numbered, write_jsonl_atomic

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


REMOTE_FILE_PREFIXES = ("hf://", "http://", "https://")


def _is_local(source: str) -> bool:
    if source.startswith(REMOTE_FILE_PREFIXES):
        return False
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists() or source.startswith((".", "/", "~"))


def _read_local_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; the location names the file and line (or row) for error messages."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", row) for n, row in iter_jsonl_numbered(path)]
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        return [(f"{path} row {n}", row) for n, row in enumerate(rows, start=1)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path} row {n}", row) for n, row in enumerate(pq.read_table(path).to_pylist(), start=1)]
    raise DataError(f"{path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")


def _read_hub_rows(name: str, split: str) -> list[tuple[str, dict]]:
    """A hub dataset by name, or one remote JSON/JSONL file (hf://datasets/..., https://...)."""
    import datasets

    try:
        if name.startswith(REMOTE_FILE_PREFIXES):
            builder = "parquet" if name.endswith(".parquet") else "json"
            dataset = datasets.load_dataset(builder, data_files=name, split="train")
        else:
            dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise DataError(f"could not load hub dataset '{name}' (split '{split}'): {err}") from None
    return [(f"{name}[{split}] row {n}", row) for n, row in enumerate(dataset, start=1)]


def load_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    if _is_local(source):
        rows = _read_local_rows(Path(source).expanduser())
    else:
        rows = _read_hub_rows(source, split)
    return rows


def alpaca_text(row: dict, where: str) -> str:
    """`instruction`, plus a space and `input` when the input is not empty."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with an 'instruction'")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: missing or empty 'instruction'")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be a string")
    return f"{instruction.strip()} {extra.strip()}" if extra.strip() else instruction.strip()


def build_seed_pool(settings: dict, out: str) -> None:
    """Stage `seed_pool`: settings = config `seed_pool` section + `seed`."""
    source = settings["source"]
    rows = load_rows(source, settings.get("split", "train"))
    texts = [alpaca_text(row, where) for where, row in rows]
    if not texts:
        raise DataError(f"{source}: the seed pool is empty (config key 'seed_pool.source')")
    unique = list(dict.fromkeys(texts))
    if len(unique) < len(texts):
        log.info("dropped %d exact duplicate seeds", len(texts) - len(unique))
    records = [{"id": f"seed-{i:05d}", "text": text} for i, text in enumerate(unique)]
    random.Random(settings["seed"]).shuffle(records)
    if settings.get("limit"):
        records = records[: settings["limit"]]
    count = write_jsonl_atomic(out, records)
    log.info("seed pool: %d seeds from %s -> %s", count, source, out)


def load_pairs(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Instruction/response pairs: fields (instruction, response) or Alpaca's (instruction, input, output)."""
    pairs = []
    for where, row in load_rows(source, split):
        text = alpaca_text(row, where)
        response = row.get("response", row.get("output"))
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{where}: missing or empty 'response' (or 'output')")
        pairs.append({"id": str(row.get("id", f"ref-{len(pairs):05d}")), "instruction": text, "response": response})
    if not pairs:
        raise DataError(f"{source}: no instruction/response pairs")
    return pairs[:limit] if limit else pairs


def build_reference_set(settings: dict, out: str) -> None:
    """Stage `reference_set`: settings = config `influence.reference` section + `eval_sources`.

    The original drew its reference set from AlpacaEval itself; scoring influence on the evaluation
    set leaks it into training, so overlap with any evaluation instruction is refused unless the
    user opts in explicitly.
    """
    pairs = load_pairs(settings["source"], settings.get("split", "train"), settings.get("limit"))
    eval_instructions = set()
    for source in settings.get("eval_sources", []):
        eval_instructions.update(alpaca_text(row, where) for where, row in load_rows(source))
    overlap = [pair["id"] for pair in pairs if pair["instruction"] in eval_instructions]
    if overlap:
        message = (f"{len(overlap)} reference instructions also appear in an evaluation set "
                   f"(e.g. {overlap[:3]}): influence would be scored on evaluation data")
        if not settings.get("allow_eval_contamination"):
            raise DataError(f"{message}; choose another 'influence.reference.source' or set "
                            f"'influence.reference.allow_eval_contamination: true' knowingly")
        log.warning("CONTAMINATION: %s (allowed by influence.reference.allow_eval_contamination)", message)
    write_jsonl_atomic(out, pairs)
    log.info("reference set: %d pairs from %s -> %s", len(pairs), settings["source"], out)
