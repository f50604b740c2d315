"""Training stages under `accelerate launch` with 2 processes (DDP over gloo, on CPU).

The stages must behave under N processes as under one: rank 0 alone writes each output, once;
the optimizer state is gathered from every rank; and 2 processes x batch 1 train exactly the
model that one process trains with batch 2. An audit hook (a `sitecustomize` on PYTHONPATH)
logs every file each rank opens for writing or renames under the run directory.

`accelerate launch --cpu` starts a single process in accelerate 1.15 (several CPU processes
need mpirun), so the launch is `--multi_gpu`, which goes through torchrun like the FSDP
launch of rules/common.smk; with CUDA hidden the stages pick CPU and gloo themselves.
FSDP itself needs GPUs and is not exercised here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from montessori import training
from montessori.chat import chat_prompt
from montessori.errors import ConfigError
from montessori.io import read_json, write_jsonl_atomic
from montessori.models import load_tokenizer
from state_helpers import load_adamw_state

RECORDS = [{"id": f"r{i}", "instruction": f"Name the number after {i}.",
            "response": f"The number after {i} is {i + 1}." + " Indeed." * (i % 3)} for i in range(8)]
WSD = {"warmup": 0.1, "stable": 0.5, "decay": 0.4, "min_lr_ratio": 0.001}
BASE = {"lr": 1e-3, "epochs": 1, "max_length": 128, "weight_decay": 0.01, "seed": 7, "chat_template": None}

AUDIT_HOOK = '''
import os
import sys

if "RANK" in os.environ and os.environ.get("AUDIT_ROOT"):
    _root = os.environ["AUDIT_ROOT"]
    _log = open(os.path.join(os.environ["AUDIT_LOGS"], "rank-" + os.environ["RANK"] + ".log"), "a", buffering=1)
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def _path(value):
        return os.fsdecode(os.fspath(value)) if isinstance(value, (str, bytes, os.PathLike)) else ""

    def _audit(event, args):
        if event == "open":
            path, mode, flags = _path(args[0]), args[1], args[2]
            if path.startswith(_root) and ((mode and any(c in mode for c in "wax+")) or (flags or 0) & _writing):
                _log.write("open\\t" + path + "\\n")
        elif event == "os.rename" and _path(args[1]).startswith(_root):
            _log.write("rename\\t" + _path(args[1]) + "\\n")

    sys.addaudithook(_audit)
'''


@pytest.fixture
def launch(tmp_path):
    """Run a stage under `accelerate launch` with 2 CPU processes; returns its stderr and, per
    rank, the (event, path) writes the audit hook saw."""
    hook_dir, logs = tmp_path / "hook", tmp_path / "audit"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)

    def run(stage: str, settings: dict, expect_rc: int = 0, **paths) -> dict:
        if logs.exists():
            for old in logs.iterdir():
                old.unlink()
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join([str(hook_dir), str(Path(__file__).resolve().parents[1])]),
               "AUDIT_ROOT": str(tmp_path / "runs"), "AUDIT_LOGS": str(logs)}
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", "-m", "montessori", stage, "--settings", json.dumps(settings)]
        for key, value in paths.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == expect_rc, done.stderr[-4000:]
        audit = {}
        for rank in (0, 1):
            log_file = logs / f"rank-{rank}.log"
            assert log_file.exists(), f"rank {rank} never started, or the audit hook did not load"
            audit[rank] = [tuple(line.split("\t")) for line in log_file.read_text().splitlines()]
        return {"audit": audit, "stderr": done.stderr}

    return run


@pytest.fixture
def runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    runs.mkdir()
    write_jsonl_atomic(runs / "train.jsonl", RECORDS)
    return runs


def weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_written_once_by_rank_zero(audit: dict, must_include: list[Path]) -> None:
    # The trainer's own checkpoints hold each rank's RNG state; they are removed once training ends.
    assert [entry for entry in audit[1] if "/checkpoint-" not in entry[1]] == []
    renamed = Counter(path for event, path in audit[0] if event == "rename")
    assert renamed and all(count == 1 for count in renamed.values()), renamed
    assert {str(path) for path in must_include} <= set(renamed)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
def test_warmup_on_two_processes_trains_the_single_process_model(runs, student, launch, tiny_model_dir):
    data = runs / "train.jsonl"
    # The reference: one process, batch 2 (this test process has no WORLD_SIZE).
    single, single_done = runs / "single", runs / "single.done"
    training.warmup({**BASE, "batch_size": 2, "effective_batch": 2, "schedule": "linear_warmup"},
                    student=str(student), data=str(data), out_dir=str(single), done=str(single_done))

    out_dir, done = runs / "warmup", runs / "warmup.done"
    result = launch("warmup", {**BASE, "batch_size": 1, "effective_batch": 2, "schedule": "linear_warmup"},
                    student=student, data=data, out_dir=out_dir, done=done)
    assert "batch 1 x 1 accumulation" in result["stderr"]      # 2 processes x 1 = one step of 2

    assert_written_once_by_rank_zero(result["audit"], [done, out_dir / "run.json", out_dir / "training_complete.json",
                                                       out_dir / "optimizer_state.safetensors"])
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in single.iterdir())
    assert read_json(done)["path"] == str(out_dir) and read_json(done)["steps"] == 4

    expected, got = weights(single), weights(out_dir)
    assert expected.keys() == got.keys()
    initial = weights(tiny_model_dir)
    assert any(not torch.equal(initial[name], got[name]) for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)

    state, reference = load_adamw_state(out_dir), load_adamw_state(single)
    from transformers import AutoModelForCausalLM

    names = {name for name, _ in AutoModelForCausalLM.from_pretrained(out_dir).named_parameters()}
    assert set(state["exp_avg"]) == set(state["exp_avg_sq"]) == names
    assert state["no_decay"] == reference["no_decay"] and state["no_decay"]
    for key in ("step", "lr", "betas", "eps", "weight_decay"):
        assert state[key] == reference[key]
    assert state["step"] == 4
    for name in names:
        assert state["exp_avg"][name].dtype == torch.float32
        assert relative_difference(state["exp_avg"][name], reference["exp_avg"][name]) < 1e-5
        assert relative_difference(state["exp_avg_sq"][name], reference["exp_avg_sq"][name]) < 1e-5


@pytest.mark.slow
def test_sft_on_two_processes_writes_one_loss_curve_and_one_card(runs, student, launch):
    data = runs / "train.jsonl"
    settings = {**BASE, "schedule": WSD, "save_steps": 2}
    reference = runs / "single.loss.json"
    training.train_sft({**settings, "batch_size": 2, "effective_batch": 2}, student=str(student), data=str(data),
                       out_dir=str(runs / "single"), done=str(runs / "single.done"), loss_json=str(reference),
                       loss_png=str(runs / "single.loss.png"))

    settings = {**settings, "batch_size": 1, "effective_batch": 2}
    out_dir = runs / "student"
    paths = {"student": student, "data": data, "out_dir": out_dir, "done": runs / "student.done",
             "loss_json": runs / "loss.json", "loss_png": runs / "loss.png"}
    result = launch("sft_student", settings, **paths)
    assert_written_once_by_rank_zero(result["audit"], [paths["done"], paths["loss_json"], paths["loss_png"],
                                                       out_dir / "training_complete.json"])
    loss = read_json(paths["loss_json"])
    assert loss["steps"] == 4 and not list(out_dir.glob("checkpoint-*"))
    expected = read_json(reference)["history"]
    assert [h["step"] for h in loss["history"]] == [h["step"] for h in expected]
    assert [h["loss"] for h in loss["history"]] == pytest.approx([h["loss"] for h in expected], rel=1e-5)
    assert [h["learning_rate"] for h in loss["history"]] == pytest.approx([h["learning_rate"] for h in expected])
    assert paths["loss_png"].read_bytes().startswith(b"\x89PNG")
    assert read_json(paths["done"])["path"] == str(out_dir)

    # Killed after the final save, before the card: every rank learns from rank 0 that the run
    # is complete, none trains again, and rank 0 alone writes the curve and the card.
    paths["done"].unlink()
    complete = (out_dir / "training_complete.json").read_text()
    result = launch("sft_student", settings, **paths)
    assert "already holds the trained model" in result["stderr"] and "trained 4 steps" not in result["stderr"]
    assert_written_once_by_rank_zero(result["audit"], [paths["done"]])
    outputs = [paths[key] for key in ("done", "loss_json", "loss_png")]
    assert {path for event, path in result["audit"][0] if event == "rename"} == {str(path) for path in outputs}
    # Nothing else is opened for writing than these outputs' temporary files.
    assert all(any(Path(path).parent == output.parent and Path(path).name.startswith(f".{output.name}.")
                   for output in outputs) for event, path in result["audit"][0] if event == "open")
    assert (out_dir / "training_complete.json").read_text() == complete


@pytest.mark.slow
def test_an_output_claimed_by_something_else_stops_every_process(runs, student, launch):
    foreign = runs / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    result = launch("warmup", {**BASE, "batch_size": 1, "effective_batch": 2}, expect_rc=1,
                    student=student, data=runs / "train.jsonl", out_dir=foreign, done=runs / "foreign.done")
    # Both ranks stop with rank 0's error (none is left waiting for the other).
    assert result["stderr"].count(f"error in stage warmup: {foreign}: exists, is not empty and was not written") == 2
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_dpo_on_two_processes_trains_the_single_process_teacher(runs, student, launch, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = runs / "pairs.jsonl"
    write_jsonl_atomic(pairs, [
        {"id": f"p{i}", "group": f"g{i}", "prompt": chat_prompt(tokenizer, f"Write a new task like example {i}."),
         "chosen": f"Describe a river in {i + 2} words.", "rejected": f"Draw map {i}"} for i in range(4)])
    settings = {"beta": 0.1, "lr": 1e-3, "epochs": 1, "max_length": 512, "schedule": WSD, "seed": 7}
    training.train_dpo({**settings, "batch_size": 2, "effective_batch": 2}, teacher=str(student), pairs=str(pairs),
                       out_dir=str(runs / "single"), done=str(runs / "single.done"),
                       loss_json=str(runs / "single.loss.json"), loss_png=str(runs / "single.loss.png"))

    paths = {"teacher": student, "pairs": pairs, "out_dir": runs / "teacher", "done": runs / "teacher.done",
             "loss_json": runs / "loss.json", "loss_png": runs / "loss.png"}
    result = launch("dpo_teacher", {**settings, "batch_size": 1, "effective_batch": 2}, **paths)
    assert_written_once_by_rank_zero(result["audit"], [paths["done"], paths["loss_json"], paths["loss_png"]])
    history, expected = read_json(paths["loss_json"])["history"], read_json(runs / "single.loss.json")["history"]
    assert len(history) == len(expected) == 2
    for key in ("loss", "rewards/margins", "learning_rate"):
        assert [h[key] for h in history] == pytest.approx([h[key] for h in expected], rel=1e-5, abs=1e-7)
    got, want = weights(paths["out_dir"]), weights(runs / "single")
    assert any(not torch.equal(got[name], weights(tiny_model_dir)[name]) for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_fsdp_without_a_full_state_dict_is_refused_before_training():
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    def trainer(state_dict_type):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)
        return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))

    with pytest.raises(ConfigError, match=r"compute\.accelerate_config.*SHARDED_STATE_DICT"):
        training._check_full_state_dict(trainer("SHARDED_STATE_DICT"))
    training._check_full_state_dict(trainer("FULL_STATE_DICT"))
