"""JSONL and JSON files: strict reading, atomic writing, append-and-resume shards.

Every stage output goes through here so that a killed job never leaves a half-written file
behind a finished-looking name, and a rerun of a shard skips the records it already wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield one dict per non-blank line; a malformed line is an error naming file and line."""
    for _, record in iter_jsonl_numbered(path):
        yield record


def iter_jsonl_numbered(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return list(iter_jsonl(path))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); results on a shared file system follow the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


class ShardWriter:
    """Append records to a shard file one at a time, resuming after a crash.

    On open, a trailing partial line (a kill in the middle of a write) is cut off, and the ids
    already present are loaded so that callers can skip them. Each append is flushed and
    fsynced: what is in the file is finished work.
    """

    def __init__(self, path: str | os.PathLike, id_key: str = "id"):
        self.path = Path(path)
        self.id_key = id_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_partial_line()
        self.records: list[dict] = read_jsonl(self.path) if self.path.exists() else []
        self.done_ids: set = {record[id_key] for record in self.records}
        self._handle = self.path.open("a", encoding="utf-8")

    def _truncate_partial_line(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with self.path.open("r+b") as handle:
            handle.truncate(keep)

    def __contains__(self, record_id) -> bool:
        return record_id in self.done_ids

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records.append(record)
        self.done_ids.add(record[self.id_key])

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def resumable_shard(out) -> Iterator[ShardWriter]:
    """A ShardWriter on `<out>.partial`, renamed to `out` when the block completes.

    Snakemake deletes a job's declared output before it runs and after it fails; appending to the
    declared file itself would throw finished records away on every rerun.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not partial.exists():
        # A finished (or hand-truncated) shard is resumed like a partial one.
        os.replace(out, partial)
    with ShardWriter(partial) as writer:
        yield writer
    os.replace(partial, out)


def shard_slice(items: Sequence, shard: int, n_shards: int) -> list:
    """Contiguous, disjoint, near-equal slices: shard i of n gets items[start_i:end_i]."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    n = len(items)
    start = n * shard // n_shards
    end = n * (shard + 1) // n_shards
    return list(items[start:end])


def merge_shards(paths: Sequence[str | os.PathLike], expected_ids: Iterable | None = None,
                 id_key: str = "id") -> list[dict]:
    """Concatenate shard files; every id must occur once, and all expected ids must be there."""
    merged: list[dict] = []
    seen: dict = {}
    for path in paths:
        for line_no, record in enumerate(iter_jsonl(path), start=1):
            if id_key not in record:
                raise DataError(f"{path}: record {line_no} has no '{id_key}'")
            record_id = record[id_key]
            if record_id in seen:
                raise DataError(f"{path}: id {record_id!r} appears twice (first in {seen[record_id]})")
            seen[record_id] = path
            merged.append(record)
    if expected_ids is not None:
        expected = list(expected_ids)
        missing = [i for i in expected if i not in seen]
        unexpected = sorted(set(seen) - set(expected), key=str)
        if missing:
            raise DataError(
                f"{len(missing)} expected ids missing from shards {list(map(str, paths))}, "
                f"e.g. {missing[:5]}; rerun the shard jobs"
            )
        if unexpected:
            raise DataError(f"shards hold ids that are not expected, e.g. {unexpected[:5]}")
    return merged
