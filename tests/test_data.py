import json

import pytest

from montessori.data import build_reference_set, build_seed_pool, load_pairs
from montessori.errors import DataError
from montessori.io import read_jsonl


def _seed(tmp_path, rows, name="seeds.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_seed_text_joins_instruction_and_input(tmp_path):
    source = _seed(tmp_path, [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a prime number.", "input": "", "output": "7"},
    ])
    out = tmp_path / "pool.jsonl"
    build_seed_pool({"source": source, "seed": 1}, str(out))
    texts = sorted(r["text"] for r in read_jsonl(out))
    assert texts == ["Name a prime number.", "Translate to French. Good morning"]
    assert all(r["id"].startswith("seed-") for r in read_jsonl(out))


def test_seed_pool_is_shuffled_with_the_seed(tmp_path):
    source = _seed(tmp_path, [{"instruction": f"Task number {i}."} for i in range(50)])
    outs = []
    for seed in (1, 1, 2):
        out = tmp_path / f"pool{len(outs)}.jsonl"
        build_seed_pool({"source": source, "seed": seed}, str(out))
        outs.append([r["id"] for r in read_jsonl(out)])
    assert outs[0] == outs[1] != outs[2]


def test_real_alpaca_slice(tmp_path, shared_data):
    out = tmp_path / "pool.jsonl"
    build_seed_pool({"source": str(shared_data / "seeds" / "alpaca_gpt4_demo_1k.json"), "seed": 0, "limit": 100}, str(out))
    records = read_jsonl(out)
    assert len(records) == 100 and len({r["id"] for r in records}) == 100


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "ok"}, {"input": "no instruction"}], r"seeds.jsonl:2: missing or empty 'instruction'"),
    ([{"instruction": "ok"}, {"instruction": "  "}], r"seeds.jsonl:2: missing or empty 'instruction'"),
    ([], r"seed pool is empty"),
])
def test_seed_errors_name_file_and_line(tmp_path, rows, message):
    source = _seed(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        build_seed_pool({"source": source, "seed": 0}, str(tmp_path / "pool.jsonl"))
    assert not (tmp_path / "pool.jsonl").exists()


def test_malformed_seed_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"instruction": "fine"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"seeds.jsonl:2: not valid JSON"):
        build_seed_pool({"source": str(path), "seed": 0}, str(tmp_path / "pool.jsonl"))


def test_json_list_and_missing_file(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps([{"instruction": "a"}, {"instructions": "b"}]))
    with pytest.raises(DataError, match=r"seeds.json row 2"):
        build_seed_pool({"source": str(path), "seed": 0}, str(tmp_path / "pool.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        build_seed_pool({"source": str(tmp_path / "nope.jsonl"), "seed": 0}, str(tmp_path / "pool.jsonl"))


def test_reference_set_refuses_eval_overlap_unless_allowed(tmp_path):
    reference = _seed(tmp_path, [{"instruction": "Say hi.", "response": "Hi!"},
                                 {"instruction": "Say bye.", "response": "Bye!"}], "ref.jsonl")
    eval_set = tmp_path / "eval.json"
    eval_set.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hello"}]))
    out = tmp_path / "reference.jsonl"
    settings = {"source": reference, "eval_sources": [str(eval_set)]}
    with pytest.raises(DataError, match="allow_eval_contamination"):
        build_reference_set(settings, str(out))
    build_reference_set({**settings, "allow_eval_contamination": True}, str(out))
    assert len(read_jsonl(out)) == 2


def test_load_pairs_accepts_alpaca_fields(tmp_path):
    source = _seed(tmp_path, [{"instruction": "Add", "input": "2+2", "output": "4"}])
    assert load_pairs(source) == [{"id": "ref-00000", "instruction": "Add 2+2", "response": "4"}]
