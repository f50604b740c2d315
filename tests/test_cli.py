import json
import subprocess
import sys

from montessori.cli import parse_args


def test_parse_args_types_and_lists():
    stage, settings, kwargs = parse_args([
        "merge_instructions", "--settings", '{"target": 3}', "--shard-paths", "a.jsonl",
        "--out", "o.jsonl", "--shard", "1", "--many", "x", "y",
    ])
    assert stage == "merge_instructions" and settings == {"target": 3}
    assert kwargs == {"shard_paths": ["a.jsonl"], "out": "o.jsonl", "shard": 1, "many": ["x", "y"]}


def test_errors_exit_2_with_message(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "ok"}\nnot json\n')
    result = subprocess.run(
        [sys.executable, "-m", "montessori", "seed_pool", "--settings",
         json.dumps({"source": str(bad), "seed": 0}), "--out", str(tmp_path / "pool.jsonl")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "seeds.jsonl:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
