"""The warm-up's AdamW state file: round trip, Trainer-style groups, accelerate wrapping, the
earlier pickled format, lazy per-tensor reading, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from montessori.errors import DataError
from montessori.optim_state import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    AdamWStateFile,
    save_adamw_state,
    trainer_param_groups,
)
from state_helpers import load_adamw_state


def trainer_style_optimizer(model, lr=1e-3, weight_decay=0.1, **kwargs):
    groups = trainer_param_groups(model, weight_decay)
    no_decay_ids = {id(p) for p in groups[1]["params"]}
    no_decay = sorted(n for n, p in model.named_parameters() if id(p) in no_decay_ids)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-7, **kwargs), no_decay


def train_steps(model, optimizer, steps=3):
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 500, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture()
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_round_trip_trainer_style_groups(tiny_model, tmp_path):
    optimizer, no_decay = trainer_style_optimizer(tiny_model)
    assert no_decay and any("norm" in n for n in no_decay)
    train_steps(tiny_model, optimizer)
    path = save_adamw_state(tiny_model, optimizer, 7.5e-4, tmp_path)
    assert path == tmp_path / STATE_FILE
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind

    state = load_adamw_state(tmp_path)
    assert state["step"] == 3
    assert state["lr"] == 7.5e-4
    assert state["betas"] == (0.9, 0.95)
    assert state["eps"] == 1e-7
    assert state["weight_decay"] == 0.1
    assert state["no_decay"] == no_decay
    names = [n for n, _ in tiny_model.named_parameters()]
    assert sorted(state["exp_avg"]) == sorted(names)
    for name, param in tiny_model.named_parameters():
        original = optimizer.state[param]
        assert state["exp_avg"][name].dtype == torch.float32
        assert torch.equal(state["exp_avg"][name], original["exp_avg"])
        assert torch.equal(state["exp_avg_sq"][name], original["exp_avg_sq"])


def test_accelerate_wrapped_optimizer_saves_the_same(tiny_model, tmp_path):
    from accelerate import Accelerator

    optimizer, _ = trainer_style_optimizer(tiny_model)
    accelerator = Accelerator(cpu=True)
    model, wrapped = accelerator.prepare(tiny_model, optimizer)
    assert wrapped is not optimizer and wrapped.optimizer is optimizer
    train_steps(model, wrapped, steps=2)
    save_adamw_state(model, wrapped, 1e-3, tmp_path / "a")
    save_adamw_state(tiny_model, optimizer, 1e-3, tmp_path / "b")
    a, b = load_adamw_state(tmp_path / "a"), load_adamw_state(tmp_path / "b")
    assert a["step"] == b["step"] == 2
    assert a["no_decay"] == b["no_decay"]
    for name in b["exp_avg"]:
        assert torch.equal(a["exp_avg"][name], b["exp_avg"][name])
        assert torch.equal(a["exp_avg_sq"][name], b["exp_avg_sq"][name])


def test_single_group_has_no_no_decay_names(tiny_model, tmp_path):
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3, weight_decay=0.01)
    train_steps(tiny_model, optimizer, steps=1)
    state = load_adamw_state(save_adamw_state(tiny_model, optimizer, 1e-3, tmp_path))
    assert state["weight_decay"] == 0.01 and state["no_decay"] == [] and state["step"] == 1


def test_unrepresentable_optimizers_are_refused(tiny_model, tmp_path):
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        save_adamw_state(tiny_model, optimizer, 1e-3, tmp_path)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        save_adamw_state(tiny_model, optimizer, float("nan"), tmp_path)
    assert not (tmp_path / STATE_FILE).exists()


def test_the_earlier_pickled_format_reads_the_same(tiny_model, tmp_path):
    """A state written as one pickled dict (the format before safetensors) and the same state
    written now load to equal values, tensor by tensor."""
    optimizer, _ = trainer_style_optimizer(tiny_model)
    train_steps(tiny_model, optimizer, steps=2)
    new = load_adamw_state(save_adamw_state(tiny_model, optimizer, 5e-4, tmp_path / "new"))
    (tmp_path / "old").mkdir()
    torch.save(new, tmp_path / "old" / LEGACY_STATE_FILE)
    old = load_adamw_state(tmp_path / "old")
    assert AdamWStateFile(tmp_path / "old").path.name == LEGACY_STATE_FILE
    for key in ("step", "lr", "betas", "eps", "weight_decay", "no_decay"):
        assert old[key] == new[key], key
    assert old["exp_avg"].keys() == new["exp_avg"].keys()
    for name in new["exp_avg"]:
        assert torch.equal(old["exp_avg"][name], new["exp_avg"][name])
        assert torch.equal(old["exp_avg_sq"][name], new["exp_avg_sq"][name])


def test_moments_are_read_one_tensor_at_a_time_without_unpickling(tiny_model, tmp_path, monkeypatch):
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    train_steps(tiny_model, optimizer, steps=1)
    save_adamw_state(tiny_model, optimizer, 1e-3, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole state was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    saved = AdamWStateFile(tmp_path)
    name, param = next(iter(tiny_model.named_parameters()))
    exp_avg, exp_avg_sq = saved.moments(name, "cpu", torch.bfloat16)
    assert exp_avg.dtype == exp_avg_sq.dtype == torch.bfloat16 and exp_avg.shape == param.shape
    assert torch.equal(exp_avg, optimizer.state[param]["exp_avg"].to(torch.bfloat16))
    with pytest.raises(DataError, match="no AdamW moments for parameter 'nope'"):
        saved.moments("nope")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_adamw_state(tmp_path)
    torch.save({"step": 1, "exp_avg": {}, "exp_avg_sq": {}}, tmp_path / LEGACY_STATE_FILE)
    with pytest.raises(DataError, match=r"optimizer_state\.pt: optimizer state lacks"):
        load_adamw_state(tmp_path / LEGACY_STATE_FILE)
    (tmp_path / STATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"optimizer_state\.safetensors: not a readable optimizer state"):
        load_adamw_state(tmp_path)
