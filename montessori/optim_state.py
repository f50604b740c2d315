"""The warm-up's AdamW state on disk: name-keyed fp32 moments, step, lr, betas, eps, weight decay.

Influence scoring replays one AdamW step from exactly the state the warm-up ended in, so the
state is stored keyed by `model.named_parameters()` names (not by optimizer slot numbers, which
depend on how param groups were built) together with the hyper-parameters of that step. Format
(docs/ARCHITECTURE.md): `{"step", "lr", "betas", "eps", "weight_decay", "no_decay", "exp_avg",
"exp_avg_sq"}`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import DataError
from .io import atomic_path

STATE_FILE = "optimizer_state.pt"
_KEYS = ("step", "lr", "betas", "eps", "weight_decay", "no_decay", "exp_avg", "exp_avg_sq")


def _unwrap_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real one in `.optimizer`.
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def _unwrap_model(model):
    # DDP / accelerate wrappers prefix names with "module."; the checkpoint uses the bare names.
    while hasattr(model, "module") and hasattr(model.module, "named_parameters"):
        model = model.module
    return model


def trainer_param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW param groups split as HF Trainer splits them: biases and norms without weight decay."""
    import torch
    from transformers.trainer_pt_utils import get_parameter_names

    # The patterns of transformers' Trainer.get_decay_parameter_names.
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], patterns))
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def save_adamw_state(model, optimizer, lr: float, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/optimizer_state.pt` from a (possibly accelerate-wrapped) torch AdamW.

    `lr` is the learning rate in force at the end of training (the one the influence step uses).
    Param groups may differ in weight decay (HF Trainer puts biases and norms in a group with
    weight decay 0); they must agree on betas and eps. Returns the file written.
    """
    import torch

    optimizer = _unwrap_optimizer(optimizer)
    model = _unwrap_model(model)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"save_adamw_state: lr must be a finite number >= 0, got {lr!r}")
    names = {id(param): name for name, param in model.named_parameters()}
    groups = optimizer.param_groups
    for option, bad in (("amsgrad", True), ("maximize", True)):
        if any(group.get(option, False) == bad for group in groups):
            raise ValueError(f"save_adamw_state: {option}={bad} is not representable in {STATE_FILE}")
    betas = {tuple(float(b) for b in group["betas"]) for group in groups}
    epss = {float(group["eps"]) for group in groups}
    if len(betas) != 1 or len(epss) != 1:
        raise ValueError(f"save_adamw_state: param groups disagree on betas {betas} or eps {epss}")
    decays = {float(group["weight_decay"]) for group in groups}
    weight_decay = max(decays)
    if decays - {weight_decay, 0.0}:
        raise ValueError(
            f"save_adamw_state: weight decays {sorted(decays)}: only one nonzero value (plus 0 for "
            f"the no-decay group) is representable"
        )

    exp_avg, exp_avg_sq, no_decay, steps = {}, {}, [], set()
    for group in groups:
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    "save_adamw_state: the optimizer holds a parameter that model.named_parameters() "
                    "does not (sharded or flattened parameters are not supported)"
                )
            name = names[id(param)]
            if group["weight_decay"] != weight_decay:
                no_decay.append(name)
            state = optimizer.state.get(param)
            if not state:
                # Never stepped (no gradient ever reached it): AdamW left it untouched too.
                continue
            steps.add(int(state["step"].item() if torch.is_tensor(state["step"]) else state["step"]))
            exp_avg[name] = state["exp_avg"].detach().to("cpu", torch.float32).clone()
            exp_avg_sq[name] = state["exp_avg_sq"].detach().to("cpu", torch.float32).clone()
    if len(steps) > 1:
        raise ValueError(f"save_adamw_state: parameters were stepped different numbers of times {sorted(steps)}")

    state = {
        "step": steps.pop() if steps else 0,
        "lr": float(lr),
        "betas": betas.pop(),
        "eps": epss.pop(),
        "weight_decay": weight_decay,
        "no_decay": sorted(no_decay),
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }
    path = Path(out_dir) / STATE_FILE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_adamw_state(path: str | os.PathLike) -> dict:
    """Read a file written by `save_adamw_state` (a directory means the file inside it)."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.exists():
        raise DataError(f"{path}: optimizer state not found (the warm-up saves it beside the weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path}: not a readable optimizer state ({err})") from None
    missing = [key for key in _KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise DataError(f"{path}: optimizer state lacks {missing}")
    if set(state["exp_avg"]) != set(state["exp_avg_sq"]):
        raise DataError(f"{path}: exp_avg and exp_avg_sq name different parameters")
    state["betas"] = tuple(state["betas"])
    return state
