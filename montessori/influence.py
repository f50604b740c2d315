"""Local data influence: how one AdamW step on a probing pair changes the reference-set loss.

For each probing pair, from the warm-up state (weights + AdamW moments + step + lr):
    loss_before = L_ref(theta)
    theta'      = one AdamW step on the pair alone
    influence   = L_ref(theta') - loss_before          (negative = the pair helps)
and, because every step carries the same warm-up momentum, also against the step with a zero
gradient for the pair (momentum only): influence_vs_momentum = L_ref(theta') - L_ref(theta_mom).
Each record also keeps `probe_loss`, the pair's own response-token loss at the warm-up weights
(the loss the step's gradient comes from): the `loss` utility signal of `pairs.signal`.

L_ref (`influence.loss_aggregation`) is the response-token cross-entropy over the reference set,
either `pooled` (sum over all tokens / number of tokens) or `batch_mean` (the original's: the mean
over consecutive batches of `influence.batch_size` records, in the file's order, of each batch's
token mean). Both are a weighted sum of per-record token sums, so the forward passes may group
the records in any way (`exact` sorts them by length) without changing the loss.

Three modes, one scorer class each:
- `exact`: the step is applied inside the backward pass (each parameter is updated as soon as
  its gradient is complete, then the gradient is freed), the reference set is evaluated in
  length-sorted batches, and the weights are restored from an in-memory snapshot. The moments
  are only read, never written, so they need no restore.
- `first_order`: influence ~= grad L_ref(theta) . delta_theta, with the reference gradient
  computed once per shard (fp32) and delta_theta the exact AdamW update (moments, bias
  correction, weight decay). No reference forward per example.
- `reference`: the original algorithm, kept for the benchmark and the equality test: reload
  weights and optimizer state from disk before every example, step with torch.optim.AdamW, and
  evaluate the reference set in file-order batches padded to `max_length` (1024 in the original),
  averaging the batches' own token means (or pooling their sums, to compare with `pooled`).
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

from .adamw_replay import Scratch, WarmupState, adamw_apply_, adamw_update_dot
from .chat import IGNORE_INDEX, encode_pair
from .errors import ConfigError, DataError, ModelError
from .io import atomic_path, resumable_shard, merge_shards, read_jsonl, shard_slice, write_json_atomic, write_jsonl_atomic
from .models import load_tokenizer, model_path
from .optim_state import AdamWStateFile
from .placement import Placement
from .seeding import derive_seed, seed_everything

log = logging.getLogger(__name__)

MODES = ("exact", "first_order", "reference")
AGGREGATIONS = ("pooled", "batch_mean")
# precision -> (weight dtype, moment dtype)
PRECISIONS = {"fp32": ("float32", "float32"), "bf16_weights": ("bfloat16", "float32"), "bf16": ("bfloat16", "bfloat16")}


# --------------------------------------------------------------------------------------------
# data and the reference loss


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
    """Right-padded tensor batches; sorted by length they waste (almost) no padding. Each batch
    carries `rows`: the positions in `encoded` of its records."""
    import torch

    positions = list(range(len(encoded)))
    if sort_by_length:
        positions.sort(key=lambda i: len(encoded[i]["input_ids"]))
    batches = []
    for start in range(0, len(positions), batch_size):
        rows = positions[start:start + batch_size]
        width = pad_to or max(len(encoded[i]["input_ids"]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            n = len(encoded[i]["input_ids"])
            ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
            labels[row, :n] = torch.tensor(encoded[i]["labels"])
            mask[row, :n] = 1
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                        "labels": labels.to(device), "rows": rows})
    return batches


def _token_losses(model, batch: dict):
    """(per-token response cross-entropies in at least fp32, the batch row of each token)."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:].to(logits.device)  # the head's device when layers span GPUs
    scored = targets != IGNORE_INDEX
    row_of_token = scored.nonzero()[:, 0]
    logits = logits[:, :-1][scored]
    per_token = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[scored],
                                reduction="none")
    return per_token, row_of_token


def response_nll(model, batch: dict):
    """(sum of response-token cross-entropies as a 0-d float64 tensor, number of response tokens).

    Each token's loss is computed on its own row of logits and the sum is taken in float64, so
    the result does not depend on batch composition or padding (an fp32 sum would, by ~1e-6).
    """
    per_token, _ = _token_losses(model, batch)
    return per_token.double().sum(), per_token.numel()


def aggregation_weights(token_counts: list[int], aggregation: str, batch_size: int) -> list[float]:
    """Per-record weights w such that L_ref = sum_r w[r] * (token-loss sum of record r).

    pooled: 1 / all tokens. batch_mean: records cut into consecutive batches of `batch_size` in
    the given (file) order; 1 / (number of batches x the tokens of the record's batch)."""
    if aggregation == "pooled":
        return [1.0 / sum(token_counts)] * len(token_counts)
    if aggregation != "batch_mean":
        raise ConfigError(f"influence.loss_aggregation: {aggregation!r} is not one of {list(AGGREGATIONS)}")
    chunks = [token_counts[start:start + batch_size] for start in range(0, len(token_counts), batch_size)]
    return [1.0 / (len(chunks) * sum(chunk)) for chunk in chunks for _ in chunk]


@dataclass
class ReferenceSet:
    """The reference records as forward batches (any grouping) and each record's loss weight."""

    batches: list[dict]
    weights: list[float]

    @classmethod
    def build(cls, encoded: list[dict], batch_size: int, aggregation: str, pad_id: int, device) -> "ReferenceSet":
        counts = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in encoded]
        return cls(make_batches(encoded, batch_size, pad_id, device), aggregation_weights(counts, aggregation, batch_size))

    def _weighted(self, per_token, rows, batch):
        import torch

        weights = torch.tensor([self.weights[i] for i in batch["rows"]], dtype=torch.float64, device=per_token.device)
        return (per_token.double() * weights[rows]).sum()

    def loss(self, model) -> float:
        """L_ref, accumulated in float64."""
        import torch

        total = 0.0
        with torch.no_grad():
            for batch in self.batches:
                total += float(self._weighted(*_token_losses(model, batch), batch))
        return total

    def backward(self, model) -> None:
        """Accumulate grad L_ref into the parameters' gradients (hooks may take them batch by batch)."""
        for batch in self.batches:
            self._weighted(*_token_losses(model, batch), batch).backward()

    @property
    def tokens(self) -> int:
        return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in self.batches)


# --------------------------------------------------------------------------------------------
# one warm-up state held in memory: the engine of `exact` and `first_order`


class WarmStart:
    """The warm-up weights and moments in memory; steps on a pair, evaluates, restores."""

    def __init__(self, model, state: WarmupState, reference: ReferenceSet):
        self.model = model
        self.state = state
        self.reference = reference
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.snapshot = {name: p.detach().clone() for name, p in self.params.items()}
        self.reference_grad: dict | None = None
        self.scratch = Scratch()
        self.loss_before = reference.loss(model)

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
        """grad L_ref at the warm-up weights, accumulated in fp32, once per shard; and each
        parameter's weight-decay term of the first-order estimate, the same for every pair."""
        import torch

        sums = {}

        def accumulate(name, param):
            grad = param.grad.to(torch.float32)
            if name in sums:
                sums[name].add_(grad)
            else:
                sums[name] = grad  # the hook drops param.grad next: this tensor is ours

        with _on_each_grad(self.params, accumulate):
            self.reference.backward(self.model)
        self.reference_grad = sums
        self.decay_dot = {}
        for name, ref in sums.items():
            decay = self.state.decay(name)
            self.decay_dot[name] = 0.0 if decay == 0 else -self.state.lr * decay * float(
                torch.dot(ref.view(-1), self.params[name].detach().to(torch.float32).reshape(-1)))

    def release_reference_grad(self) -> None:
        self.reference_grad = None

    def _first_order_dot(self, name, param, grad) -> float:
        """grad L_ref . (theta' - theta) for one parameter (0 for one without reference gradient)."""
        ref = self.reference_grad.get(name)
        if ref is None:
            return 0.0
        hyper = self._hyper(name)
        del hyper["weight_decay"]
        return adamw_update_dot(ref, grad, *self._moments(name), self.scratch, **hyper) + self.decay_dot[name]

    def step_on_pair(self, batch: dict, apply: bool, first_order: bool) -> tuple[float, float | None]:
        """Backward on the pair; each parameter's AdamW update is applied (and/or dotted with the
        reference gradient) as soon as its gradient is complete, so no full gradient is held.
        Returns (the pair's loss before the step, the first-order dot or None)."""
        dot = 0.0

        def update(name, param):
            nonlocal dot
            if first_order:
                dot += self._first_order_dot(name, param, param.grad)
            if apply:
                adamw_apply_(param, param.grad, *self._moments(name), self.scratch, **self._hyper(name))

        with _on_each_grad(self.params, update):
            total, count = response_nll(self.model, batch)
            probe_loss = total / count
            probe_loss.backward()
        return float(probe_loss.detach()), (dot if first_order else None)

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
        loss = self.reference.loss(self.model)
        self.restore()
        return loss, first_order

    def score(self, batch: dict, exact: bool, first_order: bool) -> dict:
        """{"probe_loss"}, and {"loss_after"} and/or {"first_order"}: the weights are back at the
        warm-up state after."""
        probe_loss, dot = self.step_on_pair(batch, apply=exact, first_order=first_order)
        result = {"probe_loss": probe_loss}
        if first_order:
            result["first_order"] = dot
        if exact:
            result["loss_after"] = self.reference.loss(self.model)
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
# a shard's inputs, and one scorer per mode


@dataclass
class ShardJob:
    """Everything a shard's scorer reads: settings checked, checkpoint found, records encoded."""

    mode: str
    precision: str
    shards: int
    shard: int
    aggregation: str
    batch_size: int
    max_length: int
    spearman_check: int
    checkpoint: str
    examples: list[dict]
    reference: list[dict]
    pad_id: int
    placement: Placement

    @classmethod
    def prepare(cls, settings: dict, warmup: str, probing: str, reference: str, shard: int) -> "ShardJob":
        mode, precision, shards, aggregation = _check_settings(settings)
        max_length = int(settings.get("max_length", 1024))
        checkpoint = model_path(warmup)
        if not Path(checkpoint).is_dir():
            raise ModelError(f"{warmup}: warm-up checkpoint {checkpoint} is not a directory")
        mine = shard_slice(read_jsonl(probing), int(shard), shards)
        reference_records = read_jsonl(reference)
        if not reference_records:
            raise DataError(f"{reference}: the reference set is empty")
        tokenizer = load_tokenizer(checkpoint, settings.get("chat_template"))
        return cls(
            mode=mode, precision=precision, shards=shards, shard=int(shard), aggregation=aggregation,
            batch_size=int(settings.get("batch_size", 8)), max_length=max_length,
            spearman_check=int(settings.get("spearman_check", 0)), checkpoint=checkpoint,
            examples=encode_records(tokenizer, mine, max_length, probing),
            reference=encode_records(tokenizer, reference_records, max_length, reference),
            pad_id=tokenizer.pad_token_id,
            placement=Placement.for_shard(checkpoint, int(settings.get("gpus_per_shard", 1))),
        )

    @property
    def dtypes(self) -> tuple[str, str]:
        return PRECISIONS[self.precision]

    def pair(self, example: dict, pad_to: int | None = None) -> dict:
        return make_batches([example], 1, self.pad_id, self.placement.input_device, pad_to=pad_to)[0]

    def load_model(self):
        model = self.placement.load(self.checkpoint, self.dtypes[0])
        model.eval()  # no dropout: a score must be a function of the pair alone
        return model


def _exact_fields(loss_before: float, momentum_loss: float, loss_after: float, probe_loss: float) -> dict:
    return {"loss_before": loss_before, "loss_after": loss_after, "influence": loss_after - loss_before,
            "influence_vs_momentum": loss_after - momentum_loss, "probe_loss": probe_loss}


class _InMemoryScorer:
    """Shared setup of `exact` and `first_order`: one model and state for the whole shard."""

    def __init__(self, job: ShardJob, need_reference_grad: bool):
        import torch

        self.job = job
        model = job.load_model()
        state = WarmupState.load(job.checkpoint, model, getattr(torch, job.dtypes[1]))
        reference = ReferenceSet.build(job.reference, job.batch_size, job.aggregation, job.pad_id,
                                       job.placement.input_device)
        self.engine = WarmStart(model, state, reference)
        self.loss_before = self.engine.loss_before
        self.reference_tokens = reference.tokens
        if need_reference_grad:
            self.engine.compute_reference_grad()
        self.momentum_loss, self.momentum_first_order = self.engine.momentum_only()


class ExactScorer(_InMemoryScorer):
    def __init__(self, job: ShardJob, unscored: set):
        # the first-order estimate only for the Spearman check, and only if a checked pair is left
        check = any(e["id"] in unscored for e in job.examples[:job.spearman_check])
        super().__init__(job, need_reference_grad=check)

    def score(self, index: int, example: dict) -> dict:
        check = index < self.job.spearman_check
        result = self.engine.score(self.job.pair(example), exact=True, first_order=check)
        record = _exact_fields(self.loss_before, self.momentum_loss, result["loss_after"], result["probe_loss"])
        if check:
            record.update(influence_exact=record["influence"], influence_first_order=result["first_order"])
        if index + 1 >= self.job.spearman_check:
            self.engine.release_reference_grad()  # only the Spearman check needed it
        return record


class FirstOrderScorer(_InMemoryScorer):
    def __init__(self, job: ShardJob, unscored: set):
        super().__init__(job, need_reference_grad=True)

    def score(self, index: int, example: dict) -> dict:
        check = index < self.job.spearman_check
        result = self.engine.score(self.job.pair(example), exact=check, first_order=True)
        estimate = result["first_order"]
        record = {"loss_before": self.loss_before, "loss_after": self.loss_before + estimate, "influence": estimate,
                  "influence_vs_momentum": estimate - self.momentum_first_order, "probe_loss": result["probe_loss"]}
        if check:
            record.update(influence_exact=result["loss_after"] - self.loss_before, influence_first_order=estimate)
        return record


class OriginalScorer:
    """The original algorithm (mode `reference`): everything reloaded from disk for every pair,
    the pair and every reference batch padded to `max_length`, batches in the file's order."""

    momentum_first_order = None

    def __init__(self, job: ShardJob, unscored: set):
        self.job = job
        device = job.placement.input_device
        self.batches = make_batches(job.reference, job.batch_size, job.pad_id, device, pad_to=job.max_length,
                                    sort_by_length=False)
        self.reference_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in self.batches)
        self.loss_before = original_reference_loss(job.load_model(), self.batches, job.aggregation)
        self.momentum_loss, _ = self._step_and_eval(None)

    def _step_and_eval(self, pair: dict | None) -> tuple[float, float | None]:
        """(reference loss after the step, the pair's loss before it)."""
        model, probe_loss = original_step(self.job.load_model(), self.job.checkpoint, pair)
        return original_reference_loss(model, self.batches, self.job.aggregation), probe_loss

    def score(self, index: int, example: dict) -> dict:
        loss_after, probe_loss = self._step_and_eval(self.job.pair(example, pad_to=self.job.max_length))
        return _exact_fields(self.loss_before, self.momentum_loss, loss_after, probe_loss)


SCORERS = {"exact": ExactScorer, "first_order": FirstOrderScorer, "reference": OriginalScorer}


def original_step(model, checkpoint: str, batch: dict | None):
    """One torch AdamW step from the saved state, on `batch` (or with a zero gradient when None):
    (the stepped model, the batch's loss before the step or None)."""
    import torch

    saved = AdamWStateFile(checkpoint)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = set(saved.no_decay)
    groups = [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": saved.weight_decay},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
    ]
    # foreach=False: torch's single-tensor path on every device, the one `exact` mirrors.
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=saved.lr, betas=saved.betas,
                                  eps=saved.eps, foreach=False)
    for name, param in named:
        exp_avg, exp_avg_sq = saved.moments(name, param.device, param.dtype)
        optimizer.state[param] = {"step": torch.tensor(float(saved.step)), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    probe_loss = None
    if batch is None:
        for _, param in named:
            param.grad = torch.zeros_like(param)
    else:
        total, count = response_nll(model, batch)
        loss = total / count
        loss.backward()
        probe_loss = float(loss.detach())
    optimizer.step()
    return model, probe_loss


def original_reference_loss(model, batches: list[dict], aggregation: str) -> float:
    """The original's evaluation: each batch's own token mean, averaged over batches (batch_mean),
    or all batches' token sums over their token count (pooled)."""
    import torch

    means, total, count = [], 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch_total, batch_count = response_nll(model, batch)
            means.append(float(batch_total) / batch_count)
            total += float(batch_total)
            count += batch_count
    return sum(means) / len(means) if aggregation == "batch_mean" else total / count


# --------------------------------------------------------------------------------------------
# stages


def _spearman(pairs: list[tuple[float, float]]) -> float | None:
    if len(pairs) < 2:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return None if math.isnan(rho) else float(rho)


def _check_settings(settings: dict) -> tuple[str, str, int, str]:
    mode = settings.get("mode", "exact")
    precision = settings.get("precision", "fp32")
    aggregation = settings.get("loss_aggregation", "pooled")
    if mode not in MODES:
        raise ConfigError(f"influence.mode: {mode!r} is not one of {list(MODES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"influence.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"influence.loss_aggregation: {aggregation!r} is not one of {list(AGGREGATIONS)}")
    if mode == "reference" and precision == "bf16_weights":
        raise ConfigError("influence.precision: mode 'reference' replays the original's torch AdamW, "
                          "whose moments share the weight dtype: use fp32 or bf16")
    shards = int(settings.get("shards", 1))
    if shards < 1:
        raise ConfigError(f"influence.shards must be >= 1, got {shards}")
    return mode, precision, shards, aggregation


def score_shard(settings: dict, warmup: str, probing: str, reference: str, out: str, summary: str,
                shard: int) -> None:
    """Stage `influence`: score shard `shard` of the probing set against the warm-up state."""
    started = time.time()
    seed_everything(derive_seed(settings.get("seed", 0), "influence", shard))
    job = ShardJob.prepare(settings, warmup, probing, reference, shard)

    # Records go to <out>.partial until the shard is complete: Snakemake deletes a declared
    # output before rerunning a job, which would lose every pair already scored.
    with resumable_shard(out) as writer:
        unscored = {e["id"] for e in job.examples if e["id"] not in writer}
        log.info("influence shard %s/%s: %d probing pairs, %d already scored, mode %s, precision %s, loss %s, %s",
                 shard, job.shards, len(job.examples), len(job.examples) - len(unscored), job.mode, job.precision,
                 job.aggregation, job.placement)
        setup_started = time.time()
        scorer = SCORERS[job.mode](job, unscored)
        setup_s = time.time() - setup_started
        log.info("shard %s: loss before %.6f, momentum-only step %+.3e", shard, scorer.loss_before,
                 scorer.momentum_loss - scorer.loss_before)

        for index, example in enumerate(tqdm(job.examples, desc=f"influence shard {shard}", unit="pair")):
            if example["id"] not in unscored:
                continue
            t0 = time.time()
            record = {"id": example["id"], "group": example["group"], **scorer.score(index, example)}
            record["seconds"] = time.time() - t0
            writer.append(record)
            log.info("shard %s example %s: influence %+.3e (vs momentum %+.3e) in %.2f s", shard, example["id"],
                     record["influence"], record["influence_vs_momentum"], record["seconds"])

    write_json_atomic(summary, _shard_summary(job, scorer, writer.records, setup_s, time.time() - started))


def _shard_summary(job: ShardJob, scorer, records: list[dict], setup_s: float, total_s: float) -> dict:
    checked = [(r["influence_exact"], r["influence_first_order"]) for r in records
               if "influence_exact" in r and "influence_first_order" in r]
    seconds = [r["seconds"] for r in records]
    return {
        "shard": job.shard, "shards": job.shards, "mode": job.mode, "precision": job.precision,
        "loss_aggregation": job.aggregation, "devices": job.placement.devices,
        "count": len(records), "reference_size": len(job.reference), "reference_tokens": scorer.reference_tokens,
        "loss_before": scorer.loss_before,
        # the momentum-only step is measured exactly in every mode (it is one evaluation per shard)
        "momentum_loss": scorer.momentum_loss, "momentum_influence": scorer.momentum_loss - scorer.loss_before,
        "momentum_influence_first_order": scorer.momentum_first_order,
        "fraction_negative": _fraction_negative(records, "influence"),
        "fraction_negative_vs_momentum": _fraction_negative(records, "influence_vs_momentum"),
        "spearman_first_order_vs_exact": _spearman(checked), "spearman_count": len(checked),
        "seconds": {"setup_s": setup_s, "per_example_mean": sum(seconds) / len(seconds) if seconds else None,
                    "this_run_total": total_s},
    }


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
