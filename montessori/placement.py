"""Where an influence shard's model lives: one device, or consecutive layers over several GPUs.

Layer-wise placement keeps every parameter whole on one device, which the per-parameter
AdamW-in-backward update and the in-memory restore of `influence.py` need; the GPUs of a shard
then work one after another, so it buys memory, not speed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError
from .models import default_device, load_causal_lm



def placement_units(model) -> list[tuple[str, object]]:
    """The model's modules in definition order, cut at whole transformer blocks (the classes in
    `_no_split_modules`) and at modules that hold parameters of their own."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = []

    def walk(prefix: str, module) -> None:
        children = list(module.named_children())
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not children or own or type(module).__name__ in blocks:
            units.append((prefix, module))
            return
        for name, child in children:
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return units


def layer_split(model, devices: int) -> dict[str, int]:
    """Module name -> device index: consecutive runs of modules with about equal parameter bytes
    on each device, in definition order (the forward order of Hugging Face decoder models). A
    module whose parameters are tied to an earlier one's (the LM head to the embeddings) goes to
    that device, so a tied tensor exists once.

    Layer-wise placement keeps every parameter whole on one device, which is what the per-parameter
    AdamW-in-backward update and the in-memory restore of this file need; the GPUs of a shard then
    work one after another, so it buys memory, not speed."""
    units = placement_units(model)
    counted, sizes = set(), []
    for _, module in units:
        size = 0
        for param in module.parameters():
            if id(param) not in counted:
                counted.add(id(param))
                size += param.numel() * param.element_size()
        sizes.append(size)
    share = max(sum(sizes), 1) / devices
    placed: dict[int, int] = {}
    device_map, current, done = {}, 0, 0
    for (name, module), size in zip(units, sizes):
        tied = {placed[id(p)] for p in module.parameters() if id(p) in placed}
        if tied:
            device = min(tied)
        else:
            # a unit goes where the middle of its bytes falls, never back to an earlier device
            current = device = min(devices - 1, max(current, int((done + size / 2) // share)))
        done += size
        for param in module.parameters():
            placed.setdefault(id(param), device)
        device_map[name] = device
    return device_map


def visible_gpus() -> list[str]:
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@dataclass
class Placement:
    """One device (`device_map` None), or the model's layers over the shard's devices."""

    devices: list[str]
    device_map: dict | None = None

    @classmethod
    def for_shard(cls, checkpoint: str, gpus_per_shard: int) -> "Placement":
        if gpus_per_shard < 1:
            raise ConfigError(f"influence.gpus_per_shard must be >= 1, got {gpus_per_shard}")
        if gpus_per_shard == 1:
            return cls([default_device()])
        gpus = visible_gpus()
        if len(gpus) < gpus_per_shard:
            raise ConfigError(
                f"influence.gpus_per_shard={gpus_per_shard}: this job sees {len(gpus)} CUDA device(s) "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Each influence "
                f"job asks for compute.gpus x influence.gpus_per_shard GPUs: set compute.gpus: 1, or "
                f"gpus_per_shard: 1 on a machine without that many GPUs")
        devices = gpus[:gpus_per_shard]
        split = layer_split(model_skeleton(checkpoint), gpus_per_shard)
        return cls(devices, {name: devices[index] for name, index in split.items()})

    @property
    def input_device(self) -> str:
        """Where batches go: the device of the first module (the input embeddings)."""
        return next(iter(self.device_map.values())) if self.device_map else self.devices[0]

    def load(self, checkpoint: str, weight_dtype: str):
        """On a GPU, a device map even for one device: transformers then reads each tensor of the
        checkpoint straight to the GPU instead of building the whole model in host memory first."""
        import torch

        device_map = self.device_map
        if device_map is None and self.devices[0].startswith("cuda"):
            device_map = {"": torch.device(self.devices[0])}
        return load_causal_lm(checkpoint, weight_dtype, self.devices[0], device_map=device_map)

    def __str__(self) -> str:
        if not self.device_map:
            return f"device {self.devices[0]}"
        counts = {device: list(self.device_map.values()).count(device) for device in self.devices}
        return "layers over " + ", ".join(f"{device} ({n} modules)" for device, n in counts.items())


def model_skeleton(checkpoint: str):
    """The checkpoint's model without its weights (meta tensors), for planning a placement."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    skeleton.tie_weights()
    return skeleton
