"""Benchmark the three influence modes side by side on the same model, state and data.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python scripts/bench_influence.py [--proportions paper]

Builds a warm-up state with a few real torch AdamW steps on the model, then scores the same
probing pairs against the same reference pairs with `exact` and `first_order`, and the first
`--reference-examples` of them with the original algorithm (`reference`, which reloads from disk
and pads the pair and every reference batch to `--max-length`). In the same run it times each
mode's floor: for `exact`, one forward of the reference set plus one forward and backward of the
pair; for `first_order`, one forward and backward of the pair.

`--proportions small` (the default): 32 probing and 32 reference pairs from the Alpaca-GPT4 slice
with outputs of at most 300 characters. `--proportions paper`: the original's kind of reference
set, long GPT-4 Turbo answers from the AlpacaEval 2 set in `../shared/data/alpaca_eval/` (read
there, chosen by a seeded shuffle; 64 by default, the paper used 256), and probing pairs of
realistic length (Alpaca-GPT4 answers, no length cap; 16 by default, 1 for the original).

Prints per-mode lines and, last, one line:

    influence-bench exact_speedup=<x> first_order_speedup=<y> spearman=<rho> max_abs_diff=<d>
        first_order_vs_exact=<z> sign_agreement=<s> exact_floor_x=<a> first_order_floor_x=<b>

speed-ups over `reference` (per-example means), Spearman of first_order against exact, the largest
|exact - reference| over the examples both scored (influence and influence_vs_momentum), the
speed-up of first_order over exact, the fraction of pairs where first_order and exact agree on the
sign of the influence, and each fast mode's per-example time as a multiple of its floor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = ROOT.parent / "shared" / "data"
PROPORTIONS = {
    "small": {"probing": 32, "reference": 32, "reference_examples": 3, "max_response_chars": 300},
    "paper": {"probing": 16, "reference": 64, "reference_examples": 1, "max_response_chars": None},
}


def alpaca_pairs(path: Path, max_response_chars: int | None) -> list[dict]:
    """Alpaca rows (instruction + input joined by a space) with their outputs as responses."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    pairs = []
    for index, row in enumerate(rows):
        if max_response_chars is not None and len(row["output"]) > max_response_chars:
            continue
        instruction = " ".join(part for part in (row["instruction"], row.get("input", "")) if part)
        pairs.append({"id": f"alpaca-{index:04d}", "instruction": instruction, "response": row["output"]})
    return pairs


def alpaca_eval_pairs(path: Path, count: int, seed: int) -> list[dict]:
    """`count` AlpacaEval 2 instructions with their GPT-4 Turbo answers, after a seeded shuffle."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if len(order) < count:
        raise SystemExit(f"{path}: {len(order)} rows, need {count}")
    return [{"id": f"alpaca-eval-{i:03d}", "instruction": rows[i]["instruction"], "response": rows[i]["output"]}
            for i in order[:count]]


def make_warmup(model_dir: str, pairs: list[dict], out: Path, lr: float, max_length: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from montessori.chat import encode_pair
    from montessori.optim_state import save_adamw_state, trainer_param_groups

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(trainer_param_groups(model, 0.01), lr=lr)
    for pair in pairs:
        item = encode_pair(tokenizer, pair["instruction"], pair["response"], max_length)
        loss = model(input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_adamw_state(model, optimizer, lr, out)


def time_floors(checkpoint: Path, probing: Path, reference: Path, settings: dict) -> tuple[float, float]:
    """(one forward of the reference set, mean forward+backward of one probing pair), in seconds,
    with the batches the fast modes use and no influence machinery."""
    from montessori import influence
    from montessori.io import read_jsonl
    from montessori.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(checkpoint), None)
    model = load_causal_lm(str(checkpoint), "float32", "cpu").eval()
    encode = lambda path: influence.encode_records(tokenizer, read_jsonl(path), settings["max_length"], path)  # noqa: E731
    reference_set = influence.ReferenceSet.build(encode(reference), settings["batch_size"],
                                                 settings["loss_aggregation"], tokenizer.pad_token_id, "cpu")
    t0 = time.perf_counter()
    reference_set.loss(model)
    forward_s = time.perf_counter() - t0
    pair_s = []
    for example in encode(probing):
        batch = influence.make_batches([example], 1, tokenizer.pad_token_id, "cpu")[0]
        t0 = time.perf_counter()
        total, count = influence.response_nll(model, batch)
        (total / count).backward()
        pair_s.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return forward_s, statistics.mean(pair_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proportions", choices=sorted(PROPORTIONS), default="small")
    parser.add_argument("--model", default=str(ROOT / "resources/models/smollm2-135m-instruct"))
    parser.add_argument("--data", type=Path, default=SHARED / "seeds/alpaca_gpt4_demo_1k.json",
                        help="Alpaca-format JSON (instruction, input, output): warm-up and probing pairs")
    parser.add_argument("--alpaca-eval", type=Path, default=SHARED / "alpaca_eval/gpt4_1106_preview_outputs.json",
                        help="AlpacaEval 2 outputs (instruction, output): the paper proportions' reference set")
    parser.add_argument("--probing", type=int, help="probing pairs for exact and first_order")
    parser.add_argument("--reference", type=int, help="reference pairs")
    parser.add_argument("--reference-examples", type=int,
                        help="probing pairs the slow original algorithm scores (the first ones)")
    parser.add_argument("--max-response-chars", type=int, help="small proportions: longest output kept")
    parser.add_argument("--max-length", type=int, default=1024, help="the original pads to this (1024)")
    parser.add_argument("--loss-aggregation", choices=["pooled", "batch_mean"], default="batch_mean")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42, help="the AlpacaEval shuffle (the original's was 42)")
    args = parser.parse_args()
    for key, value in PROPORTIONS[args.proportions].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from scipy.stats import spearmanr

    from montessori import influence
    from montessori.io import read_json, read_jsonl, write_jsonl_atomic
    from montessori.models import write_model_card

    pairs = alpaca_pairs(args.data, args.max_response_chars)
    if args.proportions == "paper":
        reference = alpaca_eval_pairs(args.alpaca_eval, args.reference, args.seed)
        needed = args.warmup_steps + args.probing
    else:
        needed = args.warmup_steps + args.probing + args.reference
        reference = pairs[args.warmup_steps + args.probing:needed]
    if len(pairs) < needed:
        raise SystemExit(f"{args.data}: {len(pairs)} usable rows, need {needed}")
    warm, probing = pairs[:args.warmup_steps], pairs[args.warmup_steps:args.warmup_steps + args.probing]
    for i, pair in enumerate(probing):
        pair["group"] = f"bench-g{i // 4}"
    settings = {"shards": 1, "gpus_per_shard": 1, "precision": "fp32", "batch_size": args.batch_size,
                "max_length": args.max_length, "loss_aggregation": args.loss_aggregation, "spearman_check": 0,
                "seed": 0}
    print(f"proportions {args.proportions}: {len(reference)} reference pairs "
          f"(mean {statistics.mean(len(r['response']) for r in reference):.0f} response chars), {len(probing)} "
          f"probing pairs (mean {statistics.mean(len(p['response']) for p in probing):.0f} chars), "
          f"{args.reference_examples} for the original; loss {args.loss_aggregation}, max_length {args.max_length}, "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')} threads", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-influence-") as tmp:
        work = Path(tmp)
        make_warmup(args.model, warm, work / "warmup", args.lr, args.max_length)
        write_model_card(work / "warmup.done", work / "warmup")
        write_jsonl_atomic(work / "probing.jsonl", probing)
        write_jsonl_atomic(work / "probing_head.jsonl", probing[:args.reference_examples])
        write_jsonl_atomic(work / "reference.jsonl", reference)

        forward_s, pair_s = time_floors(work / "warmup", work / "probing.jsonl", work / "reference.jsonl", settings)
        print(f"floors       reference forward {forward_s:.3f} s, pair forward+backward {pair_s:.3f} s", flush=True)

        results = {}
        for mode, probing_file in (("first_order", "probing.jsonl"), ("reference", "probing_head.jsonl"),
                                   ("exact", "probing.jsonl")):
            influence.score_shard({**settings, "mode": mode}, warmup=str(work / "warmup.done"),
                                  probing=str(work / probing_file), reference=str(work / "reference.jsonl"),
                                  out=str(work / f"scores-{mode}.jsonl"),
                                  summary=str(work / f"scores-{mode}.summary.json"), shard=0)
            records = {r["id"]: r for r in read_jsonl(work / f"scores-{mode}.jsonl")}
            summary = read_json(work / f"scores-{mode}.summary.json")
            per_example = statistics.mean(r["seconds"] for r in records.values())
            results[mode] = (records, per_example)
            print(f"{mode:12s} {len(records):3d} examples  {per_example:8.3f} s/example  "
                  f"setup {summary['seconds']['setup_s']:.1f} s  loss_before {summary['loss_before']:.6f}  "
                  f"reference tokens {summary['reference_tokens']}", flush=True)

    exact, exact_s = results["exact"]
    first_order, first_order_s = results["first_order"]
    original, original_s = results["reference"]
    ids = list(exact)
    rho = spearmanr([exact[i]["influence"] for i in ids], [first_order[i]["influence"] for i in ids]).statistic
    signs = statistics.mean((exact[i]["influence"] < 0) == (first_order[i]["influence"] < 0) for i in ids)
    max_abs_diff = max(abs(exact[i][key] - original[i][key])
                       for i in original for key in ("influence", "influence_vs_momentum"))
    negative = sum(exact[i]["influence"] < 0 for i in ids)
    negative_mom = sum(exact[i]["influence_vs_momentum"] < 0 for i in ids)
    print(f"exact: {negative}/{len(ids)} negative influence, {negative_mom}/{len(ids)} negative vs momentum")
    print(f"influence-bench exact_speedup={original_s / exact_s:.2f} first_order_speedup={original_s / first_order_s:.2f} "
          f"spearman={rho:.4f} max_abs_diff={max_abs_diff:.3g} first_order_vs_exact={exact_s / first_order_s:.2f} "
          f"sign_agreement={signs:.3f} exact_floor_x={exact_s / (forward_s + pair_s):.2f} "
          f"first_order_floor_x={first_order_s / pair_s:.2f}")


if __name__ == "__main__":
    main()
