"""Benchmark the three influence modes side by side on the same model, state and data.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python scripts/bench_influence.py [--data alpaca.json]

Builds a warm-up state with a few real torch AdamW steps on the model, then scores the same
probing pairs against the same reference pairs with `exact` and `first_order`, and the first
`--reference-examples` of them with the original algorithm (`reference`, which reloads from disk
and pads every reference batch to `--max-length`: minutes per example on a CPU). Prints
per-example seconds and, last, one line:

    influence-bench exact_speedup=<x> first_order_speedup=<y> spearman=<rho> max_abs_diff=<d>

speed-ups over `reference` (per-example mean), Spearman of first_order against exact, and the
largest |exact - reference| over the examples both scored (influence and influence_vs_momentum).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def alpaca_pairs(path: Path, max_response_chars: int) -> list[dict]:
    """Alpaca rows (instruction + input joined by a space) with their outputs as responses."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    pairs = []
    for index, row in enumerate(rows):
        if len(row["output"]) > max_response_chars:
            continue
        instruction = " ".join(part for part in (row["instruction"], row.get("input", "")) if part)
        pairs.append({"id": f"alpaca-{index:04d}", "instruction": instruction, "response": row["output"]})
    return pairs


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "resources/models/smollm2-135m-instruct"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/seeds/alpaca_gpt4_demo_1k.json",
                        help="Alpaca-format JSON (instruction, input, output)")
    parser.add_argument("--probing", type=int, default=32)
    parser.add_argument("--reference", type=int, default=32)
    parser.add_argument("--reference-examples", type=int, default=3,
                        help="probing pairs the slow original algorithm scores (the first ones)")
    parser.add_argument("--max-length", type=int, default=1024, help="the original pads to this (1024)")
    parser.add_argument("--max-response-chars", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from scipy.stats import spearmanr

    from montessori import influence
    from montessori.io import read_json, read_jsonl, write_jsonl_atomic
    from montessori.models import write_model_card

    pairs = alpaca_pairs(args.data, args.max_response_chars)
    needed = args.warmup_steps + args.probing + args.reference
    if len(pairs) < needed:
        raise SystemExit(f"{args.data}: {len(pairs)} rows with outputs <= {args.max_response_chars} chars, need {needed}")
    warm, probing, reference = (pairs[:args.warmup_steps], pairs[args.warmup_steps:args.warmup_steps + args.probing],
                                pairs[args.warmup_steps + args.probing:needed])
    for i, pair in enumerate(probing):
        pair["group"] = f"bench-g{i // 4}"

    with tempfile.TemporaryDirectory(prefix="bench-influence-") as tmp:
        work = Path(tmp)
        make_warmup(args.model, warm, work / "warmup", args.lr, args.max_length)
        write_model_card(work / "warmup.done", work / "warmup")
        write_jsonl_atomic(work / "probing.jsonl", probing)
        write_jsonl_atomic(work / "probing_head.jsonl", probing[:args.reference_examples])
        write_jsonl_atomic(work / "reference.jsonl", reference)

        results = {}
        for mode, probing_file in (("exact", "probing.jsonl"), ("first_order", "probing.jsonl"),
                                   ("reference", "probing_head.jsonl")):
            settings = {"mode": mode, "shards": 1, "gpus_per_shard": 1, "precision": "fp32",
                        "batch_size": args.batch_size, "max_length": args.max_length, "spearman_check": 0,
                        "seed": 0}
            influence.score_shard(settings, warmup=str(work / "warmup.done"), probing=str(work / probing_file),
                                  reference=str(work / "reference.jsonl"), out=str(work / f"scores-{mode}.jsonl"),
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
    max_abs_diff = max(abs(exact[i][key] - original[i][key])
                       for i in original for key in ("influence", "influence_vs_momentum"))
    negative = sum(exact[i]["influence"] < 0 for i in ids)
    negative_mom = sum(exact[i]["influence_vs_momentum"] < 0 for i in ids)
    print(f"exact: {negative}/{len(ids)} negative influence, {negative_mom}/{len(ids)} negative vs momentum")
    print(f"influence-bench exact_speedup={original_s / exact_s:.2f} first_order_speedup={original_s / first_order_s:.2f} "
          f"spearman={rho:.4f} max_abs_diff={max_abs_diff:.3g}")


if __name__ == "__main__":
    main()
