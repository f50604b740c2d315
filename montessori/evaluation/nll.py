"""A judge-free in-domain metric: the student's negative log-likelihood of held-out strong answers.

Each item is an (instruction, answer) pair with a high-quality (GPT-4-class) answer. The student
reads it through the same chat template and masking as training (`chat.encode_pair`: loss on the
answer's tokens only), and the item's NLL is the mean cross-entropy of its answer tokens. The
summary is the token-weighted mean over items (every answer token counts once, as in the training
and influence losses) with a bootstrap interval over items.

The items must be held out: an instruction that is in the seed pool (the teacher's examples) or
in the influence reference set (what the teacher is trained to help with) would measure
memorization, not help. Those are dropped and counted before `limit` applies.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..chat import IGNORE_INDEX, encode_pair
from ..data import load_pairs, reference_instructions
from ..errors import ConfigError, DataError
from ..io import read_jsonl, write_json_atomic, write_jsonl_atomic
from ..models import default_device, load_causal_lm, load_tokenizer, model_path
from ..seeding import derive_seed
from .stats import CONFIDENCE, bootstrap_interval

log = logging.getLogger(__name__)


def held_out_items(section: dict, seed_pool: str, reference: str) -> tuple[list[dict], dict]:
    """The source's pairs that are neither a seed nor a reference instruction, up to `limit`, and
    the counts of what was left out."""
    source = section.get("source")
    if not source:
        raise ConfigError("config key 'evaluation.nll.source' is not set")
    pairs = load_pairs(source, section.get("split", "train"))
    seeds = {record["text"] for record in read_jsonl(seed_pool)}
    references = reference_instructions(reference)
    in_seed_pool = [pair for pair in pairs if pair["instruction"] in seeds]
    in_reference = [pair for pair in pairs if pair["instruction"] in references and pair["instruction"] not in seeds]
    kept = [pair for pair in pairs if pair["instruction"] not in seeds and pair["instruction"] not in references]
    duplicate_ids = len(kept) - len({pair["id"] for pair in kept})
    if duplicate_ids:
        raise DataError(f"{source}: {duplicate_ids} item id(s) appear more than once (config key 'evaluation.nll.source')")
    if not kept:
        raise DataError(f"{source}: every item's instruction is in the seed pool ({seed_pool}) or the reference set "
                        f"({reference}); 'evaluation.nll.source' must hold answers the pipeline never trains on")
    selected = kept[:section["limit"]] if section.get("limit") else kept
    counts = {"in_source": len(pairs), "dropped_in_seed_pool": len(in_seed_pool),
              "dropped_in_reference": len(in_reference), "evaluated": len(selected)}
    for dropped, where in ((in_seed_pool, seed_pool), (in_reference, reference)):
        if dropped:
            log.warning("nll: %d item(s) of %s left out, their instruction is in %s (e.g. %r)",
                        len(dropped), source, where, dropped[0]["id"])
    return selected, counts


def item_nlls(model, tokenizer, items: list[dict], max_length: int, batch_size: int) -> list[dict]:
    """[{"id", "tokens", "nll"}] in the items' order: each item's answer-token count and mean NLL."""
    import torch

    from ..influence import _token_losses, make_batches

    encoded = []
    for item in items:
        pair = encode_pair(tokenizer, item["instruction"], item["response"], max_length)
        if all(label == IGNORE_INDEX for label in pair["labels"][1:]):
            raise DataError(f"nll item {item['id']!r} has no answer token within evaluation.nll.max_length="
                            f"{max_length}; raise that config key")
        encoded.append(pair)
    sums, counts = [0.0] * len(items), [0] * len(items)
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in make_batches(encoded, batch_size, tokenizer.pad_token_id, device):
            per_token, row_of_token = _token_losses(model, batch)
            # per record: the sum in float64, so batch composition and padding do not move it
            for row, position in enumerate(batch["rows"]):
                token_losses = per_token[row_of_token == row].double()
                sums[position], counts[position] = float(token_losses.sum()), int(token_losses.numel())
    return [{"id": item["id"], "tokens": n, "nll": total / n} for item, total, n in zip(items, sums, counts)]


def summarize(records: list[dict], seed: int) -> dict:
    """Token-weighted mean NLL over items and its bootstrap interval over items."""
    interval = bootstrap_interval([r["nll"] for r in records], derive_seed(seed, "nll_bootstrap"),
                                  weights=[r["tokens"] for r in records])
    return {"nll": interval["estimate"], "nll_low": interval["low"], "nll_high": interval["high"],
            "confidence": CONFIDENCE, "n_items": interval["n"], "tokens": sum(r["tokens"] for r in records)}


def evaluate_nll(settings: dict, student: str, seed_pool: str, reference: str, out: str, summary: str,
                 name: str) -> None:
    """Stage `eval_score`'s judge-free metric: per-item NLL (`out`, JSONL {"id", "tokens", "nll"}) and a summary JSON
    {"model", "source", "nll", "nll_low", "nll_high", "confidence", "n_items", "tokens", "in_source",
    "dropped_in_seed_pool", "dropped_in_reference", "evaluated", "items"} (`items`: the per-item
    file's name, beside the summary).

    settings: {"seed", "chat_template", "nll": {"source", "split", "limit", "max_length", "batch_size"}}
    (batch_size arrives through --runtime: the per-record float64 sums do not depend on it).
    """
    section = settings.get("nll", {})
    items, counts = held_out_items(section, seed_pool, reference)
    path = model_path(student)
    tokenizer = load_tokenizer(path, settings.get("chat_template"))
    model = load_causal_lm(path, "float32", default_device()).eval()
    records = item_nlls(model, tokenizer, items, int(section.get("max_length", 1024)), int(section.get("batch_size", 8)))
    write_jsonl_atomic(out, records)
    result = {"model": name, "source": section["source"], **summarize(records, int(settings.get("seed", 0))),
              **counts, "items": Path(out).name}
    write_json_atomic(summary, result)
    log.info("nll %s: %.4f [%s, %s] over %d items (%d tokens) of %s", name, result["nll"], result["nll_low"],
             result["nll_high"], result["n_items"], result["tokens"], section["source"])
