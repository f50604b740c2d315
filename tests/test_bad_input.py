"""Bad input stops the pipeline with a message naming the file, line or config key, and leaves what
is already finished intact. Config and model errors go through `snakemake` (they stop before any
job, or in the cheap `prepare_model` job); data errors through the stage CLI the rules call."""

from __future__ import annotations

import json
import socket

import pytest
import yaml
from pipeline_helpers import (
    LOCAL_CORES,
    ROOT,
    TINY,
    TINY_RESULTS,
    make_workdir,
    output_mtimes,
    pipeline_env,
    read_jsonl,
    run_snakemake,
    run_stage,
)

FINISHED_TARGETS = (f"{TINY_RESULTS}/seed_pool.jsonl", f"{TINY_RESULTS}/reference.jsonl",
                    f"{TINY_RESULTS}/models/teacher.json")


@pytest.fixture(scope="module")
def finished_workdir(module_tmp):
    """A run of the tiny config whose first jobs (seed pool, reference set, teacher card) finished."""
    workdir = make_workdir(module_tmp / "work")
    # Targets go before --configfile, which takes every value that follows it.
    run = run_snakemake(workdir, *LOCAL_CORES, *FINISHED_TARGETS, *TINY)
    assert run.returncode == 0, run.stdout
    return workdir


def snakemake_with(workdir, tmp_path, override: dict, *targets: str):
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return run_snakemake(workdir, *LOCAL_CORES, *targets, *TINY, str(path))


def assert_untouched(workdir, before: dict[str, int], contents: dict[str, bytes]) -> None:
    assert {name: mtime for name, mtime in output_mtimes(workdir).items() if name in before} == before
    for name, data in contents.items():
        assert (workdir / name).read_bytes() == data, f"{name} changed"


def snapshot(workdir) -> tuple[dict[str, int], dict[str, bytes]]:
    before = output_mtimes(workdir)
    assert set(FINISHED_TARGETS) <= set(before)
    return before, {name: (workdir / name).read_bytes() for name in FINISHED_TARGETS}


@pytest.mark.slow
@pytest.mark.parametrize(("override", "named"), [
    ({"synthesis": {"shard": 2}}, ["config key 'synthesis.shard'", "Additional properties"]),
    ({"synthesis": {"shards": "two"}}, ["config key 'synthesis.shards'", "'two' is not of type 'integer'"]),
    ({"influence": {"shards": 5}}, ["config key 'influence.shards'", "probes.probing_size"]),
], ids=["unknown-key", "wrong-type", "probing-set-smaller-than-shards"])
def test_a_bad_config_stops_before_any_job(finished_workdir, tmp_path, override, named):
    before, contents = snapshot(finished_workdir)
    run = snakemake_with(finished_workdir, tmp_path, override)
    assert run.returncode != 0
    for text in named:
        assert text in run.stdout, run.stdout
    assert "Building DAG of jobs" not in run.stdout, "the config is checked before any job is planned"
    assert_untouched(finished_workdir, before, contents)


@pytest.mark.slow
@pytest.mark.parametrize(("student", "named"), [
    ("/nonexistent/montessori-student", "not an existing directory"),
    # A hub name with HF_HUB_OFFLINE=1 (the tests' environment) that is not in the local cache.
    ("montessori-tests/no-such-model", "neither a local directory nor in the Hugging Face cache"),
], ids=["missing-path", "hub-name-offline"])
def test_a_missing_student_stops_its_job_with_the_key(finished_workdir, tmp_path, student, named):
    before, contents = snapshot(finished_workdir)
    card = f"{TINY_RESULTS}/models/student.json"
    run = snakemake_with(finished_workdir, tmp_path, {"models": {"student": student}}, card)
    assert run.returncode != 0
    assert f"config key 'models.student': '{student}'" in run.stdout, run.stdout
    assert named in run.stdout
    assert "Traceback" not in run.stdout
    assert not (finished_workdir / card).exists()
    assert_untouched(finished_workdir, before, contents)


def assert_stage_error(result, stage: str, *named: str) -> None:
    assert result.returncode == 2, result.stdout
    assert f"error in stage {stage}: " in result.stdout
    for text in named:
        assert text in result.stdout, result.stdout
    assert "Traceback" not in result.stdout


def finished_stage_output(stage: str, settings: dict, out, cwd, **paths) -> bytes:
    """Run the stage on good input: the finished output a later failure must leave alone."""
    args = [item for key, value in paths.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    result = run_stage(stage, settings, *args, "--out", str(out), cwd=cwd)
    assert result.returncode == 0, result.stdout
    return out.read_bytes()


SEED_SETTINGS = {"split": "train", "limit": None, "seed": 42}
REFERENCE_SETTINGS = {"split": "train", "limit": 4, "allow_eval_contamination": False,
                      "eval_sources": [str(ROOT / "data" / "eval" / "alpaca_eval.json")]}


def assert_bad_source_fails_and_keeps_output(tmp_path, stage: str, settings: dict, good_source: str,
                                             bad_text: str, *expected: str) -> None:
    """The stage finished on `good_source`, rerun on a source file holding `bad_text`: an error
    naming what `expected` says ({source} is the bad file) and the finished output untouched."""
    out = tmp_path / f"{stage}.jsonl"
    finished = finished_stage_output(stage, settings | {"source": good_source}, out, ROOT)
    source = tmp_path / f"{stage}-source.jsonl"
    source.write_text(bad_text)

    result = run_stage(stage, settings | {"source": str(source)}, "--out", str(out), cwd=tmp_path)
    assert_stage_error(result, stage, *(text.format(source=source) for text in expected))
    assert out.read_bytes() == finished


def test_a_malformed_seed_line_names_file_and_line(tmp_path):
    good = (ROOT / "data" / "seeds.jsonl").read_text().splitlines()
    bad = "\n".join(good[:2] + ['{"instruction": "Name three rivers."'] + good[2:5]) + "\n"
    assert_bad_source_fails_and_keeps_output(tmp_path, "seed_pool", SEED_SETTINGS, "data/seeds.jsonl", bad,
                                             "{source}:3: not valid JSON")


def test_an_empty_seed_pool_names_the_key(tmp_path):
    assert_bad_source_fails_and_keeps_output(tmp_path, "seed_pool", SEED_SETTINGS, "data/seeds.jsonl", "\n",
                                             "{source}", "the seed pool is empty", "seed_pool.source")


def test_a_malformed_reference_line_names_file_and_line(tmp_path):
    good = (ROOT / "data" / "reference.jsonl").read_text().splitlines()
    bad = "\n".join(good[:4] + ['{"instruction": "Add 2 and 3.", "response": 5,}'] + good[4:6]) + "\n"
    assert_bad_source_fails_and_keeps_output(tmp_path, "reference_set", REFERENCE_SETTINGS, "data/reference.jsonl",
                                             bad, "{source}:5: not valid JSON")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def student_outputs(tmp_path):
    """Student outputs for the first evaluation instructions, as eval_generate writes them."""
    rows = json.loads((ROOT / "data" / "eval" / "alpaca_eval.json").read_text())[:2]
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps([{"dataset": row["dataset"], "instruction": row["instruction"],
                                 "output": "Water it every day.", "generator": "base"} for row in rows]))
    return path


def judge_with_api(student_outputs, tmp_path, base_url: str, env: dict[str, str]):
    judge = {"type": "api", "model": "judge-model", "base_url": base_url,
             "api_key_env": "MONTESSORI_TEST_JUDGE_KEY", "max_new_tokens": 8}
    settings = {"seed": 42, "chat_template": None, "judge": judge,
                "alpaca_eval": {"source": "data/eval/alpaca_eval.json", "reference": "dataset"}}
    # The AlpacaEval comparison comes first in the job, so its error stops it before MT-Bench.
    return run_stage("eval_judge", settings, "--outputs", str(student_outputs),
                     "--reference-paths", f"dataset={ROOT / 'data' / 'eval' / 'alpaca_eval.json'}",
                     "--annotations-paths", str(tmp_path / "annotations.json"),
                     "--metrics-paths", str(tmp_path / "metrics.json"),
                     "--cache-paths", str(tmp_path / "judge_cache.jsonl"),
                     "--answers", str(tmp_path / "answers.jsonl"), "--judgments", str(tmp_path / "judgment.jsonl"),
                     "--scores", str(tmp_path / "scores.json"), "--mt-bench-cache", str(tmp_path / "mt_cache.jsonl"),
                     cwd=tmp_path, env=env)


def test_an_unreachable_judge_names_the_config_key(student_outputs, tmp_path):
    before = student_outputs.read_bytes()
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    result = judge_with_api(student_outputs, tmp_path, base_url, pipeline_env(MONTESSORI_TEST_JUDGE_KEY="sk-test"))
    assert_stage_error(result, "eval_judge", f"could not reach {base_url}/chat/completions",
                       "config key 'evaluation.judge'")
    assert student_outputs.read_bytes() == before
    assert not (tmp_path / "metrics.json").exists()
    assert read_jsonl(tmp_path / "judge_cache.jsonl") == [], "no judgement was made, none is cached"


def test_a_missing_api_key_names_the_variable_and_key(student_outputs, tmp_path):
    env = pipeline_env()
    env.pop("MONTESSORI_TEST_JUDGE_KEY", None)
    result = judge_with_api(student_outputs, tmp_path, f"http://127.0.0.1:{closed_port()}/v1", env)
    assert_stage_error(result, "eval_judge", "config key 'evaluation.judge'",
                       "'MONTESSORI_TEST_JUDGE_KEY'", "is not set")
    assert not (tmp_path / "annotations.json").exists()

