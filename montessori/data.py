"""Seed pool and reference pairs: a hub dataset name, a remote file URL, or a local .json/.jsonl/.parquet."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from .errors import ConfigError, DataError
from .io import iter_jsonl_numbered, read_jsonl, write_jsonl_atomic
from .seeding import derive_seed

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


ALPACA_FIELDS = {"instruction": "instruction", "input": "input"}


def selected_rows(rows: list[tuple[str, dict]], match: dict, source: str) -> list[tuple[str, dict]]:
    """The rows whose fields equal `match` (config `seed_pool.where`); a field no row has is an error."""
    for field in match:
        if rows and not any(isinstance(row, dict) and field in row for _, row in rows):
            raise ConfigError(f"config key 'seed_pool.where': no row of {source} has a field {field!r}")
    return [(where, row) for where, row in rows
            if isinstance(row, dict) and all(row.get(field) == value for field, value in match.items())]


def seed_text(row: dict, where: str, fields: dict) -> str:
    """alpaca_text of the row's fields named by config `seed_pool.fields`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with an '{fields['instruction']}'")
    column = fields["instruction"]
    if column not in row:
        raise DataError(f"{where}: missing or empty '{column}' (config key 'seed_pool.fields.instruction')")
    mapped = {"instruction": row[column]}
    if fields.get("input"):
        mapped["input"] = row.get(fields["input"])
    return alpaca_text(mapped, where)


def build_seed_pool(settings: dict, out: str, reference: str | None = None) -> None:
    """Stage `seed_pool`: settings = config `seed_pool` section + `seed`.

    `fields` names the source's instruction and input fields (Alpaca's by default), `where` keeps
    only the rows whose fields have the given values (OpenAssistant/oasst1 is a message tree: its
    seeds are the first user turns, `role: prompter`, `parent_id: null`).
    `reference` (the reference set): its instructions are left out, so that the teacher never sees
    as an example a prompt the student's influence is measured on (kind `clean` holds them out of
    this very dataset).
    """
    source = settings["source"]
    fields = {**ALPACA_FIELDS, **(settings.get("fields") or {})}
    match = settings.get("where") or {}
    rows = selected_rows(load_rows(source, settings.get("split", "train")), match, source)
    texts = [seed_text(row, where, fields) for where, row in rows]
    if not texts:
        raise DataError(f"{source}: the seed pool is empty (config keys 'seed_pool.source', 'seed_pool.where')")
    unique = list(dict.fromkeys(texts))
    if len(unique) < len(texts):
        log.info("dropped %d exact duplicate seeds", len(texts) - len(unique))
    if reference:
        held_out = reference_instructions(reference)
        kept = [text for text in unique if text not in held_out]
        log.info("left %d seeds out: they are reference-set instructions (%s)", len(unique) - len(kept), reference)
        unique = kept
        if not unique:
            raise DataError(f"{source}: every seed is a reference-set instruction ({reference})")
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


# The original measures influence on the first 256 rows of AlpacaEval 2's GPT-4 Turbo outputs
# (its data/reference_dataset, row for row the head of alpaca_eval's gpt4_1106_preview
# model_outputs.json), in the order `datasets.Dataset.shuffle(seed=42)` gives them; that order
# sets which rows share a batch when the loss is averaged per batch.
PAPER_REFERENCE_SIZE = 256
PAPER_SHUFFLE_SEED = 42
REFERENCE_KINDS = ("file", "clean", "paper")


def eval_instructions(source: str) -> set[str]:
    """Every prompt of an evaluation set: Alpaca-style `instruction` (+ `input`), or MT-Bench `turns`."""
    texts = set()
    for where, row in load_rows(source):
        if isinstance(row, dict) and isinstance(row.get("turns"), list):
            texts.update(turn.strip() for turn in row["turns"] if isinstance(turn, str))
        else:
            texts.add(alpaca_text(row, where))
    return texts


def paper_reference(pairs: list[dict], size: int = PAPER_REFERENCE_SIZE) -> list[dict]:
    """The original's reference rows: the first `size` in file order, permuted as its seeded shuffle does
    (`Dataset.shuffle(seed)` draws numpy's default_rng(seed).permutation)."""
    import numpy as np

    if len(pairs) < size:
        raise DataError(f"influence.reference.kind 'paper' needs {size} rows, the source has {len(pairs)}")
    head = [{**pair, "id": f"alpaca_eval-{index:03d}"} for index, pair in enumerate(pairs[:size])]
    return [head[int(i)] for i in np.random.default_rng(PAPER_SHUFFLE_SEED).permutation(size)]


def clean_reference(pairs: list[dict], size: int, min_response_chars: int, excluded: set[str], seed: int) -> list[dict]:
    """`size` long-answer pairs held out by a seeded draw, none of them an evaluation prompt.

    Long answers: the original's GPT-4 Turbo answers average about 2,300 characters, Alpaca-GPT4's
    about 700; the loss on a reference set of short answers weighs other tokens."""
    candidates = [pair for pair in pairs
                  if len(pair["response"]) >= min_response_chars and pair["instruction"] not in excluded]
    unique = list({pair["instruction"]: pair for pair in candidates}.values())
    if len(unique) < size:
        raise DataError(f"influence.reference: only {len(unique)} pairs of the source have a response of at least "
                        f"{min_response_chars} characters (influence.reference.min_response_chars) and no "
                        f"evaluation prompt; influence.reference.size asks for {size}")
    random.Random(derive_seed(seed, "reference_set")).shuffle(unique)
    return [{**pair, "id": f"ref-{index:05d}"} for index, pair in enumerate(unique[:size])]


def build_reference_set(settings: dict, out: str) -> None:
    """Stage `reference_set`: settings = config `influence.reference` section + `eval_sources` + `seed`.

    kind `file`: the source's pairs as they are (up to `limit`). kind `paper`: the original's 256
    AlpacaEval rows (see `paper_reference`). kind `clean`: held out of the seed dataset
    (see `clean_reference`); the seed pool stage then drops these instructions.
    The original drew its reference set from AlpacaEval itself; scoring influence on the evaluation
    set leaks it into training, so overlap with any evaluation instruction is refused unless the
    user opts in explicitly (the AlpacaEval evaluation then leaves those instructions out).
    """
    kind = settings.get("kind", "file")
    if kind not in REFERENCE_KINDS:
        raise ConfigError(f"config key 'influence.reference.kind': {kind!r} is not one of {', '.join(REFERENCE_KINDS)}")
    pairs = load_pairs(settings["source"], settings.get("split", "train"))
    eval_texts = set()
    for source in settings.get("eval_sources", []):
        eval_texts |= eval_instructions(source)
    if kind == "paper":
        pairs = paper_reference(pairs)
    elif kind == "clean":
        pairs = clean_reference(pairs, int(settings.get("size", PAPER_REFERENCE_SIZE)),
                                int(settings.get("min_response_chars", 0)), eval_texts, int(settings.get("seed", 0)))
    elif settings.get("limit"):
        pairs = pairs[: settings["limit"]]
    overlap = [pair["id"] for pair in pairs if pair["instruction"] in eval_texts]
    if overlap:
        message = (f"{len(overlap)} reference instructions also appear in an evaluation set "
                   f"(e.g. {overlap[:3]}): influence would be scored on evaluation data")
        if not settings.get("allow_eval_contamination"):
            raise DataError(f"{message}; choose another 'influence.reference.source' or set "
                            f"'influence.reference.allow_eval_contamination: true' knowingly")
        log.warning("CONTAMINATION: %s (allowed by influence.reference.allow_eval_contamination; the AlpacaEval "
                    "evaluation leaves them out)", message)
    write_jsonl_atomic(out, pairs)
    mean_chars = sum(len(pair["response"]) for pair in pairs) / len(pairs)
    log.info("reference set (%s): %d pairs from %s, responses %.0f characters on average -> %s",
             kind, len(pairs), settings["source"], mean_chars, out)


def reference_instructions(path: str | Path) -> set[str]:
    return {record["instruction"] for record in read_jsonl(path)}
