"""The warm-up's AdamW state on disk: name-keyed fp32 moments, step, lr, betas, eps, weight decay.

Influence scoring replays one AdamW step from exactly the state the warm-up ended in, so the
state is stored keyed by `model.named_parameters()` names (not by optimizer slot numbers, which
depend on how param groups were built) together with the hyper-parameters of that step.

Format (docs/ARCHITECTURE.md): `optimizer_state.safetensors`, tensors `exp_avg/<name>` and
`exp_avg_sq/<name>` (fp32), metadata key `adamw` = JSON `{"step", "lr", "betas", "eps",
"weight_decay", "no_decay"}`. Safetensors, not a pickle, because the reader must fetch one tensor
at a time straight to its parameter's device: for an 8B student the moments are 64 GB, which a
`torch.load` would first materialize in host memory. Files of the earlier format
(`optimizer_state.pt`, one pickled dict) are still read, memory-mapped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import DataError
from .io import atomic_path

STATE_FILE = "optimizer_state.safetensors"
LEGACY_STATE_FILE = "optimizer_state.pt"
_METADATA_KEY = "adamw"
_HYPER_KEYS = ("step", "lr", "betas", "eps", "weight_decay", "no_decay")
_MOMENTS = ("exp_avg", "exp_avg_sq")


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


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _hyperparameters(groups: list[dict]) -> tuple[tuple, float, float]:
    """(betas, eps, weight decay) shared by every param group, or ValueError if not representable."""
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
    return betas.pop(), epss.pop(), weight_decay


def _local_state(model, optimizer) -> tuple[list[tuple[float, list[str]]], dict]:
    """([(weight decay, param names)] per group, {name: AdamW state}) of an optimizer in this process."""
    import torch

    names = {id(param): name for name, param in model.named_parameters()}
    groups, states = [], {}
    for group in optimizer.param_groups:
        group_names = []
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    "save_adamw_state: the optimizer holds a parameter that model.named_parameters() "
                    "does not (sharded or flattened parameters are not supported)"
                )
            name = names[id(param)]
            group_names.append(name)
            state = optimizer.state.get(param)
            if state:
                states[name] = {
                    "step": state["step"],
                    "exp_avg": state["exp_avg"].detach().to("cpu", torch.float32).clone(),
                    "exp_avg_sq": state["exp_avg_sq"].detach().to("cpu", torch.float32).clone(),
                }
        groups.append((float(group["weight_decay"]), group_names))
    return groups, states


def _gathered_state(model, optimizer) -> tuple[list[tuple[float, list[str]]], dict] | None:
    """`_local_state` assembled from every process (FSDP shards, or DDP replicas): a collective
    that every process must enter; the full state lands on rank 0 only, in host memory, and the
    other ranks get None. `model` is the wrapped model the optimizer trains (DDP, FSDP or FSDP2):
    torch maps the wrapper's parameter names to the bare ones `named_parameters()` gives."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    gathered = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    groups = [(float(group["weight_decay"]), list(group["params"])) for group in gathered["param_groups"]]
    states = {
        name: {"step": state["step"], "exp_avg": state["exp_avg"].to(torch.float32),
               "exp_avg_sq": state["exp_avg_sq"].to(torch.float32)}
        for name, state in gathered["state"].items() if state
    }
    return groups, states


def save_adamw_state(model, optimizer, lr: float, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/optimizer_state.safetensors` from a (possibly accelerate-wrapped) torch AdamW.

    `lr` is the learning rate in force at the end of training (the one the influence step uses).
    Param groups may differ in weight decay (HF Trainer puts biases and norms in a group with
    weight decay 0); they must agree on betas and eps. Returns the file written.

    Under a multi-process launch (torch.distributed initialized, world size > 1) every process
    must call this with its wrapped model: the state is gathered from all of them and rank 0
    alone writes the file (the same file as one process would write).
    """
    import torch
    from safetensors.torch import save_file

    optimizer = _unwrap_optimizer(optimizer)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"save_adamw_state: lr must be a finite number >= 0, got {lr!r}")
    betas, eps, weight_decay = _hyperparameters(optimizer.param_groups)
    path = Path(out_dir) / STATE_FILE
    if _is_distributed():
        collected = _gathered_state(model, optimizer)
        if collected is None:
            return path
        groups, states = collected
    else:
        groups, states = _local_state(_unwrap_model(model), optimizer)

    no_decay = [name for decay, names in groups if decay != weight_decay for name in names]
    steps = {int(s["step"].item() if torch.is_tensor(s["step"]) else s["step"]) for s in states.values()}
    if len(steps) > 1:
        raise ValueError(f"save_adamw_state: parameters were stepped different numbers of times {sorted(steps)}")
    hyper = {"step": steps.pop() if steps else 0, "lr": float(lr), "betas": list(betas), "eps": eps,
             "weight_decay": weight_decay, "no_decay": sorted(no_decay)}
    # Parameters absent from the optimizer state never had a gradient: AdamW left them untouched too.
    tensors = {f"{moment}/{name}": s[moment].contiguous() for name, s in states.items() for moment in _MOMENTS}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(hyper)})
    return path


class AdamWStateFile:
    """A saved AdamW state, read lazily: the hyper-parameters at once, each moment tensor only
    when asked for, and then straight onto the device given (host memory holds at most one tensor)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = next((path / name for name in (STATE_FILE, LEGACY_STATE_FILE) if (path / name).exists()),
                        path / STATE_FILE)
        if not path.exists():
            raise DataError(f"{path}: optimizer state not found (the warm-up saves it beside the weights)")
        self.path = path
        self._handles: dict = {}
        self._legacy: dict | None = None
        if path.suffix == ".pt":
            hyper, names = self._open_legacy()
        else:
            hyper, names = self._open_safetensors()
        missing = [key for key in _HYPER_KEYS if key not in hyper]
        if missing:
            raise DataError(f"{path}: optimizer state lacks {missing}")
        if names["exp_avg"] != names["exp_avg_sq"]:
            raise DataError(f"{path}: exp_avg and exp_avg_sq name different parameters")
        self.step = int(hyper["step"])
        self.lr = float(hyper["lr"])
        self.betas = tuple(float(b) for b in hyper["betas"])
        self.eps = float(hyper["eps"])
        self.weight_decay = float(hyper["weight_decay"])
        self.no_decay = list(hyper["no_decay"])
        self.names = set(names["exp_avg"])

    def _open_safetensors(self) -> tuple[dict, dict]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                metadata, keys = handle.metadata() or {}, list(handle.keys())
            hyper = json.loads(metadata[_METADATA_KEY]) if _METADATA_KEY in metadata else {}
        except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
            raise DataError(f"{self.path}: not a readable optimizer state ({err})") from None
        names = {moment: {k.split("/", 1)[1] for k in keys if k.startswith(moment + "/")} for moment in _MOMENTS}
        return hyper, names

    def _open_legacy(self) -> tuple[dict, dict]:
        import torch

        try:
            # mmap: tensors stay on disk until each is copied to its device
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise DataError(f"{self.path}: not a readable optimizer state ({err})") from None
        if not isinstance(state, dict) or any(moment not in state for moment in _MOMENTS):
            raise DataError(f"{self.path}: optimizer state lacks {[m for m in _MOMENTS if m not in state]}")
        self._legacy = state
        return state, {moment: set(state[moment]) for moment in _MOMENTS}

    def moments(self, name: str, device="cpu", dtype=None):
        """(exp_avg, exp_avg_sq) of parameter `name` on `device`, in `dtype` (default: as stored)."""
        if name not in self.names:
            raise DataError(f"{self.path}: no AdamW moments for parameter {name!r}")
        pair = []
        for moment in _MOMENTS:
            if self._legacy is not None:
                tensor = self._legacy[moment][name].to(device)
            else:
                device_key = str(device)
                if device_key not in self._handles:
                    from safetensors import safe_open

                    self._handles[device_key] = safe_open(str(self.path), framework="pt", device=device_key)
                tensor = self._handles[device_key].get_tensor(f"{moment}/{name}")
            pair.append(tensor if dtype is None else tensor.to(dtype))
        return tuple(pair)
