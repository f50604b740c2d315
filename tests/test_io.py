import json

import pytest

from montessori.errors import DataError
from montessori.io import (ShardWriter, merge_shards, read_jsonl, shard_slice, write_json_atomic,
                           write_jsonl_atomic)


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: not valid JSON"):
        read_jsonl(path)


def test_read_jsonl_rejects_non_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: expected a JSON object"):
        read_jsonl(path)


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"id": 1}])

    def broken():
        yield {"id": 2}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, broken())
    assert read_jsonl(path) == [{"id": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_shard_writer_resumes_and_drops_partial_line(tmp_path):
    path = tmp_path / "shard.jsonl"
    with ShardWriter(path) as writer:
        writer.append({"id": "a", "v": 1})
        writer.append({"id": "b", "v": 2})
    with path.open("a") as handle:  # a kill in the middle of writing record c
        handle.write('{"id": "c", "v"')
    with ShardWriter(path) as writer:
        assert writer.done_ids == {"a", "b"}
        assert "c" not in writer
        writer.append({"id": "c", "v": 3})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_shard_slice_is_a_disjoint_cover():
    items = list(range(10))
    slices = [shard_slice(items, i, 3) for i in range(3)]
    assert sum(slices, []) == items
    assert [len(s) for s in slices] == [3, 3, 4]
    with pytest.raises(ValueError):
        shard_slice(items, 3, 3)


def test_merge_shards_checks_completeness(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl_atomic(a, [{"id": 1}, {"id": 2}])
    write_jsonl_atomic(b, [{"id": 3}])
    assert [r["id"] for r in merge_shards([a, b], expected_ids=[1, 2, 3])] == [1, 2, 3]
    with pytest.raises(DataError, match="missing"):
        merge_shards([a], expected_ids=[1, 2, 3])
    write_jsonl_atomic(b, [{"id": 2}])
    with pytest.raises(DataError, match="appears twice"):
        merge_shards([a, b])


def test_write_json_atomic_round_trip(tmp_path):
    write_json_atomic(tmp_path / "s.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2]}


def test_atomic_outputs_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "shared.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
