"""Local data influence: how one AdamW step on a probing pair changes the reference-set loss.

For each probing pair, from the warm-up state (weights + AdamW moments + step + lr):
    loss_before = L_ref(theta)
    theta'      = one AdamW step on the pair alone
    influence   = L_ref(theta') - loss_before          (negative = the pair helps)
and, because every step carries the same warm-up momentum, also against the step with a zero
gradient for the pair (momentum only): influence_vs_momentum = L_ref(theta') - L_ref(theta_mom).

Three modes share this file:
- `exact`: the step is applied inside the backward pass (each parameter is updated as soon as
  its gradient is complete, then the gradient is freed), the reference set is evaluated in
  length-sorted batches, and the weights are restored from an in-memory snapshot. The moments
  are only read, never written, so they need no restore.
- `first_order`: influence ~= grad L_ref(theta) . delta_theta, with the reference gradient
  computed once per shard (fp32) and delta_theta the exact AdamW update (moments, bias
  correction, weight decay). No reference forward per example.
- `reference`: the original algorithm, kept for the benchmark and the equality test: reload
  weights and optimizer state from disk before every example, step with torch.optim.AdamW, and
  evaluate the reference set in batches of 8 padded to `max_length` (1024 in the original).

The loss is the token mean of the cross-entropy over response tokens, pooled over the whole
reference set (sum over tokens / number of tokens), so it does not depend on how the set is
batched: that is what lets `exact` and `reference` agree to rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .chat import IGNORE_INDEX, encode_pair
from .errors import ConfigError, DataError, ModelError
from .io import atomic_path, resumable_shard, merge_shards, read_jsonl, shard_slice, write_json_atomic, write_jsonl_atomic
from .models import default_device, load_causal_lm, load_tokenizer, model_path
from .optim_state import load_adamw_state
from .seeding import derive_seed, seed_everything

log = logging.getLogger(__name__)

MODES = ("exact", "first_order", "reference")
# precision -> (weight dtype, moment dtype)
PRECISIONS = {"fp32": ("float32", "float32"), "bf16_weights": ("bfloat16", "float32"), "bf16": ("bfloat16", "bfloat16")}
ORIGINAL_BATCH_SIZE = 8


# --------------------------------------------------------------------------------------------
# data


def encode_records(tokenizer, records: list[dict], max_length: int, source) -> list[dict]:
    """Tokenize (instruction, response) records; a pair left without response tokens is an error."""
    encoded = []
    for record in records:
        for key in ("id", "instruction", "response"):
            if key not in record:
                raise DataError(f"{source}: record {record.get('id', '?')!r} has no '{key}'")
        item = encode_pair(tokenizer, record["instruction"], record["response"], max_length)
        if all(label == IGNORE_INDEX for label in item["labels"][1:]):
            raise DataError(
                f"{source}: record {record['id']!r} has no response token within "
                f"influence.max_length={max_length}; raise that config key"
            )
        encoded.append({"id": record["id"], "group": record.get("group"), **item})
    return encoded


def make_batches(encoded: list[dict], batch_size: int, pad_id: int, device, pad_to: int | None = None,
                 sort_by_length: bool = True) -> list[dict]:
    """Right-padded tensor batches; sorted by length they waste (almost) no padding."""
    import torch

    order = sorted(encoded, key=lambda e: len(e["input_ids"])) if sort_by_length else list(encoded)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = pad_to or max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, example in enumerate(chunk):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return batches


def response_nll(model, batch: dict):
    """(sum of response-token cross-entropies as a 0-d float64 tensor, number of response tokens).

    Each token's loss is computed on its own row of logits and the sum is taken in float64, so
    the result does not depend on batch composition or padding (an fp32 sum would, by ~1e-6).
    """
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:].to(logits.device)  # the head's device when layers span GPUs
    scored = targets != IGNORE_INDEX
    logits = logits[:, :-1][scored]
    per_token = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[scored],
                                reduction="none")
    return per_token.double().sum(), int(scored.sum())


def reference_loss(model, batches: list[dict]) -> float:
    """Token-mean response loss over all batches, accumulated in float64."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch_total, batch_count = response_nll(model, batch)
            total += float(batch_total)
            count += batch_count
    return total / count


# --------------------------------------------------------------------------------------------
# AdamW from a restored state


@dataclass
class WarmupState:
    """The warm-up's AdamW state, keyed by parameter name, each moment on its parameter's device."""

    step: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    no_decay: set
    exp_avg: dict
    exp_avg_sq: dict

    @classmethod
    def load(cls, path, model, moment_dtype) -> "WarmupState":
        raw = load_adamw_state(path)
        params = {name: param for name, param in model.named_parameters() if param.requires_grad}
        missing = [name for name in params if name not in raw["exp_avg"]]
        if missing:
            raise ModelError(f"{path}: no AdamW moments for parameters {missing[:5]} (of {len(missing)})")
        return cls(
            step=int(raw["step"]), lr=float(raw["lr"]), betas=tuple(map(float, raw["betas"])),
            eps=float(raw["eps"]), weight_decay=float(raw["weight_decay"]), no_decay=set(raw["no_decay"]),
            exp_avg={n: raw["exp_avg"][n].to(p.device, moment_dtype) for n, p in params.items()},
            exp_avg_sq={n: raw["exp_avg_sq"][n].to(p.device, moment_dtype) for n, p in params.items()},
        )

    def decay(self, name: str) -> float:
        return 0.0 if name in self.no_decay else self.weight_decay


class Scratch:
    """Reusable fp32 work buffers (the size of the largest parameter, per device): the update runs
    once per parameter per example, and fresh multi-hundred-MB allocations each time cost more than
    the arithmetic."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, index: int, like):
        import torch

        key = (like.device, index)
        if key not in self.buffers or self.buffers[key].numel() < like.numel():
            self.buffers[key] = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return self.buffers[key][:like.numel()].view(like.shape)


def _new_moments(grad, exp_avg, exp_avg_sq, scratch: Scratch, step: int, betas, eps: float):
    """(m', denom) of the step, in scratch buffers 0 and 1, by torch's operations in torch's order."""
    import torch

    beta1, beta2 = betas
    grad = grad.to(torch.float32)
    exp_avg_new = torch.lerp(exp_avg.to(torch.float32), grad, 1 - beta1, out=scratch.get(0, grad))
    denom = torch.mul(exp_avg_sq.to(torch.float32), beta2, out=scratch.get(1, grad))
    denom.addcmul_(grad, grad, value=1 - beta2)
    denom.sqrt_().div_((1 - beta2 ** (step + 1)) ** 0.5).add_(eps)
    return exp_avg_new, denom


def adamw_apply_(param, grad, exp_avg, exp_avg_sq, scratch: Scratch, *, step: int, lr: float, betas,
                 eps: float, weight_decay: float) -> None:
    """One torch.optim.AdamW step (its single-tensor path) on `param` in place; the moments given
    are only read. In fp32 the result is bit-identical to `AdamW.step()`; with bf16 weights or
    moments the arithmetic is fp32 and only the new weight is rounded."""
    import torch

    exp_avg_new, denom = _new_moments(grad, exp_avg, exp_avg_sq, scratch, step, betas, eps)
    work = param if param.dtype == torch.float32 else scratch.get(2, param).copy_(param)
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    work.addcdiv_(exp_avg_new, denom, value=-(lr / (1 - betas[0] ** (step + 1))))
    if work is not param:
        param.copy_(work)


def adamw_delta(param, grad, exp_avg, exp_avg_sq, scratch: Scratch, *, step: int, lr: float, betas,
                eps: float, weight_decay: float):
    """theta' - theta of that same step, computed directly (no cancellation): fp32, in scratch."""
    import torch

    exp_avg_new, denom = _new_moments(grad, exp_avg, exp_avg_sq, scratch, step, betas, eps)
    delta = exp_avg_new.div_(denom).mul_(-(lr / (1 - betas[0] ** (step + 1))))
    if weight_decay != 0:
        delta.add_(param.to(torch.float32), alpha=-lr * weight_decay)
    return delta


class Scorer:
    """Scores pairs from one warm-up state held in memory (the `exact` and `first_order` modes)."""

    def __init__(self, model, state: WarmupState, reference_batches: list[dict]):
        self.model = model
        self.state = state
        self.reference_batches = reference_batches
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.snapshot = {name: p.detach().clone() for name, p in self.params.items()}
        self.reference_grad: dict | None = None
        self.scratch = Scratch()
        self.loss_before = reference_loss(model, reference_batches)

    def _hyper(self, name: str) -> dict:
        s = self.state
        return {"step": s.step, "lr": s.lr, "betas": s.betas, "eps": s.eps, "weight_decay": s.decay(name)}

    def _moments(self, name: str):
        return self.state.exp_avg[name], self.state.exp_avg_sq[name]

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.snapshot[name])

    def compute_reference_grad(self) -> None:
        """grad L_ref at the warm-up weights, accumulated in fp32, once per shard."""
        import torch

        sums = {}

        def accumulate(name, param):
            grad = param.grad.to(torch.float32)
            if name in sums:
                sums[name].add_(grad)
            else:
                sums[name] = grad

        count = 0
        with _on_each_grad(self.params, accumulate):
            for batch in self.reference_batches:
                batch_total, batch_count = response_nll(self.model, batch)
                batch_total.backward()  # a token sum; the mean's divisor is known at the end
                count += batch_count
        self.reference_grad = {name: grad.div_(count) for name, grad in sums.items()}

    def release_reference_grad(self) -> None:
        self.reference_grad = None

    def _first_order_dot(self, name, param, grad) -> float:
        import torch

        ref = self.reference_grad.get(name)
        if ref is None:
            return 0.0
        delta = adamw_delta(param, grad, *self._moments(name), self.scratch, **self._hyper(name))
        return float(torch.dot(ref.view(-1), delta.view(-1)))

    def step_on_pair(self, batch: dict, apply: bool, first_order: bool) -> float | None:
        """Backward on the pair; each parameter's AdamW update is applied (and/or dotted with the
        reference gradient) as soon as its gradient is complete, so no full gradient is held."""
        dot = 0.0

        def update(name, param):
            nonlocal dot
            if first_order:
                dot += self._first_order_dot(name, param, param.grad)
            if apply:
                adamw_apply_(param, param.grad, *self._moments(name), self.scratch, **self._hyper(name))

        with _on_each_grad(self.params, update):
            total, count = response_nll(self.model, batch)
            (total / count).backward()
        return dot if first_order else None

    def momentum_only(self) -> tuple[float, float | None]:
        """Reference loss after a step with a zero gradient (exact), and its first-order estimate."""
        import torch

        first_order = 0.0 if self.reference_grad is not None else None
        with torch.no_grad():
            for name, param in self.params.items():
                zero = torch.zeros_like(param)
                if first_order is not None:
                    first_order += self._first_order_dot(name, param, zero)
                adamw_apply_(param, zero, *self._moments(name), self.scratch, **self._hyper(name))
        loss = reference_loss(self.model, self.reference_batches)
        self.restore()
        return loss, first_order

    def score(self, batch: dict, exact: bool, first_order: bool) -> dict:
        """{"loss_after"} and/or {"first_order"}: the weights are back at the warm-up state after."""
        result = {}
        dot = self.step_on_pair(batch, apply=exact, first_order=first_order)
        if first_order:
            result["first_order"] = dot
        if exact:
            result["loss_after"] = reference_loss(self.model, self.reference_batches)
            self.restore()
        return result


@contextlib.contextmanager
def _on_each_grad(params: dict, fn):
    """Call fn(name, param) without autograd as soon as a parameter's gradient is complete during
    backward, then free that gradient. Parameters may be changed in place in fn: autograd no
    longer needs their value once their gradient is accumulated."""
    import torch

    def hook_for(name):
        def hook(param):
            with torch.no_grad():
                fn(name, param)
            param.grad = None
        return hook

    handles = [param.register_post_accumulate_grad_hook(hook_for(name)) for name, param in params.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# where a shard's model lives: one device, or consecutive layers over several GPUs


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
        return load_causal_lm(checkpoint, weight_dtype, self.devices[0], device_map=self.device_map)

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


# --------------------------------------------------------------------------------------------
# the original algorithm (mode `reference`)


def original_step_and_eval(checkpoint: str, weight_dtype: str, placement: "Placement", batch: dict | None,
                           reference_batches: list[dict]) -> float:
    """Reload weights and AdamW state from disk, one torch AdamW step (on `batch`, or with a zero
    gradient when None), reference loss after."""
    import torch

    model = placement.load(checkpoint, weight_dtype)
    model.eval()
    raw = load_adamw_state(checkpoint)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n not in raw["no_decay"]], "weight_decay": raw["weight_decay"]},
        {"params": [p for n, p in named if n in raw["no_decay"]], "weight_decay": 0.0},
    ]
    # foreach=False: torch's single-tensor path on every device, the one `exact` mirrors.
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=raw["lr"], betas=raw["betas"],
                                  eps=raw["eps"], foreach=False)
    for name, param in named:
        optimizer.state[param] = {
            "step": torch.tensor(float(raw["step"])),
            "exp_avg": raw["exp_avg"][name].to(param.device, param.dtype),
            "exp_avg_sq": raw["exp_avg_sq"][name].to(param.device, param.dtype),
        }
    if batch is None:
        for _, param in named:
            param.grad = torch.zeros_like(param)
    else:
        total, count = response_nll(model, batch)
        (total / count).backward()
    optimizer.step()
    return reference_loss(model, reference_batches)


# --------------------------------------------------------------------------------------------
# stages


def _spearman(pairs: list[tuple[float, float]]) -> float | None:
    if len(pairs) < 2:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return None if math.isnan(rho) else float(rho)


def _check_settings(settings: dict) -> tuple[str, str, int]:
    mode = settings.get("mode", "exact")
    precision = settings.get("precision", "fp32")
    if mode not in MODES:
        raise ConfigError(f"influence.mode: {mode!r} is not one of {list(MODES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"influence.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if mode == "reference" and precision == "bf16_weights":
        raise ConfigError("influence.precision: mode 'reference' replays the original's torch AdamW, "
                          "whose moments share the weight dtype: use fp32 or bf16")
    shards = int(settings.get("shards", 1))
    if shards < 1:
        raise ConfigError(f"influence.shards must be >= 1, got {shards}")
    return mode, precision, shards


def score_shard(settings: dict, warmup: str, probing: str, reference: str, out: str, summary: str,
                shard: int) -> None:
    """Stage `influence`: score shard `shard` of the probing set against the warm-up state."""
    import torch

    started = time.time()
    mode, precision, shards = _check_settings(settings)
    max_length = int(settings.get("max_length", 1024))
    batch_size = int(settings.get("batch_size", 8))
    spearman_check = int(settings.get("spearman_check", 0))
    seed_everything(derive_seed(settings.get("seed", 0), "influence", shard))
    weight_dtype, moment_dtype = PRECISIONS[precision]

    checkpoint = model_path(warmup)
    if not Path(checkpoint).is_dir():
        raise ModelError(f"{warmup}: warm-up checkpoint {checkpoint} is not a directory")
    probing_records = read_jsonl(probing)
    mine = shard_slice(probing_records, int(shard), shards)
    reference_records = read_jsonl(reference)
    if not reference_records:
        raise DataError(f"{reference}: the reference set is empty")
    tokenizer = load_tokenizer(checkpoint, settings.get("chat_template"))
    pad_id = tokenizer.pad_token_id
    examples = encode_records(tokenizer, mine, max_length, probing)
    encoded_reference = encode_records(tokenizer, reference_records, max_length, reference)
    placement = Placement.for_shard(checkpoint, int(settings.get("gpus_per_shard", 1)))
    device = placement.input_device

    # Records go to <out>.partial until the shard is complete: Snakemake deletes a declared
    # output before rerunning a job, which would lose every pair already scored.
    with resumable_shard(out) as writer:
        todo = [e for e in examples if e["id"] not in writer]
        log.info("influence shard %s/%s: %d probing pairs, %d already scored, mode %s, precision %s, %s",
                 shard, shards, len(examples), len(examples) - len(todo), mode, precision, placement)

        setup_started = time.time()
        timings = {}
        if mode == "reference":
            batches = make_batches(encoded_reference, ORIGINAL_BATCH_SIZE, pad_id, device, pad_to=max_length,
                                   sort_by_length=False)
            model = placement.load(checkpoint, weight_dtype)
            model.eval()
            loss_before = reference_loss(model, batches)
            del model
            momentum_loss = original_step_and_eval(checkpoint, weight_dtype, placement, None, batches)
            momentum_first_order = None
        else:
            batches = make_batches(encoded_reference, batch_size, pad_id, device)
            model = placement.load(checkpoint, weight_dtype)
            model.eval()  # no dropout: a score must be a function of the pair alone
            state = WarmupState.load(checkpoint, model, getattr(torch, moment_dtype))
            scorer = Scorer(model, state, batches)
            loss_before = scorer.loss_before
            need_first_order = mode == "first_order" or (spearman_check > 0 and any(
                e["id"] not in writer for e in examples[:spearman_check]))
            if need_first_order:
                scorer.compute_reference_grad()
            momentum_loss, momentum_first_order = scorer.momentum_only()
        timings["setup_s"] = time.time() - setup_started
        momentum_change = momentum_loss - loss_before
        log.info("shard %s: loss before %.6f, momentum-only step %+.3e", shard, loss_before, momentum_change)

        for index, example in enumerate(tqdm(examples, desc=f"influence shard {shard}", unit="pair")):
            if example["id"] in writer:
                continue
            t0 = time.time()
            pair = make_batches([example], 1, pad_id, device)[0]
            record = {"id": example["id"], "group": example["group"]}
            check = index < spearman_check
            if mode == "reference":
                loss_after = original_step_and_eval(checkpoint, weight_dtype, placement, pair, batches)
                record.update(loss_before=loss_before, loss_after=loss_after, influence=loss_after - loss_before,
                              influence_vs_momentum=loss_after - momentum_loss)
            elif mode == "exact":
                result = scorer.score(pair, exact=True, first_order=check)
                loss_after = result["loss_after"]
                record.update(loss_before=loss_before, loss_after=loss_after, influence=loss_after - loss_before,
                              influence_vs_momentum=loss_after - momentum_loss)
                if check:
                    record.update(influence_exact=record["influence"], influence_first_order=result["first_order"])
            else:
                result = scorer.score(pair, exact=check, first_order=True)
                estimate = result["first_order"]
                record.update(loss_before=loss_before, loss_after=loss_before + estimate, influence=estimate,
                              influence_vs_momentum=estimate - momentum_first_order)
                if check:
                    record.update(influence_exact=result["loss_after"] - loss_before, influence_first_order=estimate)
            if mode == "exact" and index + 1 >= spearman_check and scorer.reference_grad is not None:
                scorer.release_reference_grad()  # only the Spearman check needed it
            record["seconds"] = time.time() - t0
            writer.append(record)
            log.info("shard %s example %s: influence %+.3e (vs momentum %+.3e) in %.2f s", shard, example["id"],
                     record["influence"], record["influence_vs_momentum"], record["seconds"])

    records = writer.records
    checked = [(r["influence_exact"], r["influence_first_order"]) for r in records
               if "influence_exact" in r and "influence_first_order" in r]
    seconds = [r["seconds"] for r in records]
    write_json_atomic(summary, {
        "shard": int(shard), "shards": shards, "mode": mode, "precision": precision, "devices": placement.devices,
        "count": len(records), "reference_size": len(reference_records),
        "reference_tokens": sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
        "loss_before": loss_before,
        # the momentum-only step is measured exactly in every mode (it is one evaluation per shard)
        "momentum_loss": momentum_loss, "momentum_influence": momentum_change,
        "momentum_influence_first_order": momentum_first_order,
        "fraction_negative": _fraction_negative(records, "influence"),
        "fraction_negative_vs_momentum": _fraction_negative(records, "influence_vs_momentum"),
        "spearman_first_order_vs_exact": _spearman(checked), "spearman_count": len(checked),
        "seconds": {**timings, "per_example_mean": sum(seconds) / len(seconds) if seconds else None,
                    "this_run_total": time.time() - started},
    })


def _fraction_negative(records: list[dict], key: str) -> float | None:
    return sum(r[key] < 0 for r in records) / len(records) if records else None


def _mean_std(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None}
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}


def merge_influence(settings: dict, shard_paths: list[str], probing: str, out: str, summary: str,
                    histogram: str) -> None:
    """Stage `merge_influence`: every probing id scored exactly once -> table, summary, histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(shard_paths, (str, os.PathLike)):
        shard_paths = [shard_paths]
    probing_ids = [record["id"] for record in read_jsonl(probing)]
    merged = merge_shards(shard_paths, expected_ids=probing_ids)
    position = {record_id: i for i, record_id in enumerate(probing_ids)}
    merged.sort(key=lambda r: position[r["id"]])
    write_jsonl_atomic(out, merged)

    checked = [(r["influence_exact"], r["influence_first_order"]) for r in merged
               if "influence_exact" in r and "influence_first_order" in r]
    write_json_atomic(summary, {
        "count": len(merged), "shards": len(shard_paths),
        "fraction_negative": {"influence": _fraction_negative(merged, "influence"),
                              "influence_vs_momentum": _fraction_negative(merged, "influence_vs_momentum")},
        "influence": _mean_std([r["influence"] for r in merged]),
        "influence_vs_momentum": _mean_std([r["influence_vs_momentum"] for r in merged]),
        "spearman_first_order_vs_exact": _spearman(checked), "spearman_count": len(checked),
        "seconds_per_example": _mean_std([r["seconds"] for r in merged])["mean"],
    })

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("influence", "loss after - loss before"),
                       ("influence_vs_momentum", "loss after - loss after momentum-only step")):
        axis.hist([r[key] for r in merged], bins=30, alpha=0.6, label=label)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("reference-loss change (negative = helpful)")
    axis.set_ylabel("probing pairs")
    axis.set_title(f"Local data influence ({len(merged)} pairs)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(histogram) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    log.info("merged %d influence records from %d shards into %s", len(merged), len(shard_paths), out)
