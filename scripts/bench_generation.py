"""Batched vs one-prompt-at-a-time generation with the transformers backend, side by side in one run.

    python scripts/bench_generation.py [--prompts 16] [--max-new-tokens 48] [--model DIR]

Both modes answer the same chat prompts greedily (so they write nearly the same text), through the
same `TransformersGenerator` the synthesis stages use; throughput is generated tokens (the outputs
re-tokenized) per second of generation. Last line:
`generation-bench batched_speedup=<batched tokens/s over one-at-a-time tokens/s>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from montessori.generation import TransformersGenerator  # noqa: E402
from montessori.io import read_jsonl  # noqa: E402
from montessori.models import prepare_model  # noqa: E402


def load_instructions(path: Path, count: int) -> list[str]:
    texts = []
    for record in read_jsonl(path):
        text = record.get("text") or (record["instruction"] + (" " + record["input"] if record.get("input") else ""))
        texts.append(text)
    if len(texts) < count:
        raise SystemExit(f"{path}: {len(texts)} instructions, fewer than --prompts {count}")
    return texts[:count]


def timed(generator: TransformersGenerator, prompts: list[str], sampling: dict) -> tuple[float, int]:
    started = time.perf_counter()
    outputs = generator.generate(prompts, sampling, n=1, seed=0)
    seconds = time.perf_counter() - started
    tokens = sum(len(generator.tokenizer(texts[0], add_special_tokens=False)["input_ids"]) for texts in outputs)
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--seeds", default=str(ROOT / "data" / "seeds.jsonl"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    import torch

    model_dir = args.model or prepare_model(
        "smollm2-135m-instruct", ROOT / "resources" / "models" / "smollm2-135m-instruct.bench-card.json",
        ROOT / "resources" / "models")["path"]
    generator = TransformersGenerator(model_dir, batch_size=args.prompts)
    prompts = [generator.chat_prompt(text) for text in load_instructions(Path(args.seeds), args.prompts)]
    sampling = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}
    generator.generate(prompts[:1], {**sampling, "max_new_tokens": 2}, n=1, seed=0)  # first-call overhead

    print(f"model {model_dir}, {args.prompts} prompts, {args.max_new_tokens} new tokens at most, "
          f"torch threads {torch.get_num_threads()}, device {generator.model.device}")
    generator.batch_size = 1
    single_seconds, single_tokens = timed(generator, prompts, sampling)
    generator.batch_size = args.prompts
    batched_seconds, batched_tokens = timed(generator, prompts, sampling)
    single_rate, batched_rate = single_tokens / single_seconds, batched_tokens / batched_seconds
    print(f"one at a time: {single_tokens} tokens in {single_seconds:.1f} s = {single_rate:.1f} tokens/s")
    print(f"batched ({args.prompts}): {batched_tokens} tokens in {batched_seconds:.1f} s = {batched_rate:.1f} tokens/s")
    print(f"generation-bench batched_speedup={batched_rate / single_rate:.2f}")


if __name__ == "__main__":
    main()
