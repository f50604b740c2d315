"""The LLM2LLM baseline (Lee et al., 2024, arXiv:2403.15042): targeted, iterative data augmentation.

LLM2LLM's loop, as this project builds it (docs/methods.md, "LLM2LLM"):

  D_0 = a seeded sample of the seed pool, answered by the teacher        (`llm2llm_seeds`, then the
                                                                          synthesis response stages)
  for k = 1 .. rounds:
      M_{k-1} = the untrained student fine-tuned on D_{k-1}              (`sft_student`, round k-1)
      H_k     = the seed examples of D_0 with the highest loss under M_{k-1}   (`llm2llm_hard_examples`)
      A_k     = one new instruction per hard seed, written by the teacher from it
                (`llm2llm_augment`), answered by the teacher              (the synthesis response stages)
      D_k     = D_{k-1} + A_k                                             (`llm2llm_training_set`)
  round k's student (`llm2llm-round<k>`) = the untrained student fine-tuned on D_k.

Only seed examples are ever scored or used as prompts, never earlier augmentations: LLM2LLM's rule,
which keeps errors of the teacher's own data from compounding. "Wrong" is the highest per-example
loss (open-ended instructions have no right answer to compare with).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

from tqdm import tqdm

from .errors import ConfigError, DataError
from .generation import Generator, make_generator
from .io import read_jsonl, resumable_shard, write_json_atomic, write_jsonl_atomic
from .prompts import PromptStyle, extract_instruction, prompt_style
from .seeding import derive_seed
from .synthesis import FilterState, GeneratorFactory, read_seed_pool

log = logging.getLogger(__name__)

# Reasons a candidate is not added, in the order they are checked; `not_needed` = a sibling written
# before it from the same hard seed was already kept (one new example per hard seed, as LLM2LLM).
REJECTION_REASONS = ("no_instruction", "too_short", "too_long", "banned_word", "leading_char", "near_duplicate",
                     "not_needed")


def default_seed_size(train_set_size: int) -> int:
    """D_0's size when `llm2llm.seed_size` is null: half the other methods' training set, so that with
    the default hard_fraction 0.5 the paper's two iterations end at most at train_set.size examples
    (D_0 + 2 x D_0 / 2), the budget every other method's student is trained on."""
    return max(1, train_set_size // 2)


def hard_count(n_seeds: int, hard_fraction: float) -> int:
    """How many seed examples count as wrong: the fraction rounded up, at least one."""
    if not 0 < hard_fraction <= 1:
        raise ConfigError(f"config key 'llm2llm.hard_fraction' must be in (0, 1], got {hard_fraction}")
    return max(1, math.ceil(n_seeds * hard_fraction - 1e-9))


def select_hard_examples(scored: list[dict], hard_fraction: float) -> list[dict]:
    """The `hard_count` records with the highest `loss`, hardest first; equal losses in id order, so
    the choice does not depend on the file's order."""
    ranked = sorted(scored, key=lambda record: (-record["loss"], record["id"]))
    return ranked[:hard_count(len(scored), hard_fraction)]


# ---- the augmentation prompt -------------------------------------------------------------------
# LLM2LLM's own prompts (SqueezeAILab/LLM2LLM, one per dataset) show the teacher one example the
# student got wrong and ask for a new one like it, of the same kind and difficulty, not a copy.
# Its datasets are tasks with gold answers (GSM8K, CaseHOLD, SNIPS, TREC, SST-2); this is that
# request written for open-ended instructions, in the tags of the configured synthesis.prompt_style
# so that the project's extraction (prompts.extract_instruction) reads the answer.
def augmentation_request(seed_instruction: str, style: PromptStyle) -> str:
    """The user message asking the teacher for one new instruction modelled on a hard seed."""
    return (
        "A student model is learning to follow instructions, and it still struggles with the "
        f"instruction below (between {style.open_tag} and {style.close_tag} tags):\n\n"
        f"{style.open_tag}{seed_instruction}{style.close_tag}\n\n"
        "Write one new instruction that trains the same skill: of the same kind, on a related topic "
        "and at the same difficulty, but not a copy or a rewording of it. It must be a clear "
        "instruction a helpful assistant could carry out with text alone. Reply with only the new "
        f"instruction between {style.open_tag} and {style.close_tag} tags."
    )


# ---- stage: D_0 --------------------------------------------------------------------------------
def build_seed_set(settings: dict, seed_pool: str, out: str) -> None:
    """Stage `llm2llm_seeds`: D_0's instructions, a seeded sample of `seed_size` seeds.

    Settings: seed_size, seed. The records are instruction records (id, group, instruction,
    seed_id) for the synthesis response stages, which have the teacher answer them.
    """
    size = int(settings["seed_size"])
    seeds = read_seed_pool(seed_pool)
    if size > len(seeds):
        raise ConfigError(f"config key 'llm2llm.seed_size': {size} seed examples asked for, the seed pool "
                          f"{seed_pool} has {len(seeds)}")
    sample = random.Random(derive_seed(int(settings.get("seed", 0)), "llm2llm_seeds")).sample(seeds, size)
    records = [{"id": f"llm2llm-{seed['id']}", "group": f"llm2llm-{seed['id']}", "instruction": seed["text"],
                "seed_id": seed["id"]} for seed in sample]
    write_jsonl_atomic(out, records)
    log.info("llm2llm seed set: %d of %d seeds -> %s", len(records), len(seeds), out)


# ---- stage: the hard seed examples ---------------------------------------------------------------
def score_seed_examples(settings: dict, student: str, seeds: str, out: str, summary: str) -> None:
    """Stage `llm2llm_hard_examples`: the student's loss on every D_0 example, and the hardest ones.

    `out` holds the hard examples (the seed's record plus `loss`, its mean response-token
    cross-entropy, `tokens` and `rank`, 1 = hardest); `summary` every seed's loss and the counts.
    The loss is the training loss (chat.encode_pair's masking, evaluation.nll's per-item scorer) at
    sft.max_length. Settings: hard_fraction, max_length, batch_size, chat_template.
    """
    from .evaluation.nll import item_nlls
    from .models import default_device, load_causal_lm, load_tokenizer, model_path

    records = read_jsonl(seeds)
    if not records:
        raise DataError(f"{seeds}: the LLM2LLM seed set is empty")
    path = model_path(student)
    tokenizer = load_tokenizer(path, settings.get("chat_template"))
    model = load_causal_lm(path, "float32", default_device()).eval()
    try:
        losses = item_nlls(model, tokenizer, records, int(settings["max_length"]), int(settings["batch_size"]))
    except DataError as err:
        raise DataError(f"{seeds}: {err} (here the key is 'sft.max_length', the length the student trains at)") from None
    scored = [{**record, "loss": item["nll"], "tokens": item["tokens"]} for record, item in zip(records, losses)]
    hard = [{**record, "rank": rank} for rank, record in
            enumerate(select_hard_examples(scored, float(settings["hard_fraction"])), start=1)]
    write_jsonl_atomic(out, hard)
    all_losses = [record["loss"] for record in scored]
    write_json_atomic(summary, {
        "student": path, "seeds": len(scored), "hard": len(hard), "hard_fraction": settings["hard_fraction"],
        "mean_loss": sum(all_losses) / len(all_losses),
        "mean_hard_loss": sum(record["loss"] for record in hard) / len(hard),
        "lowest_hard_loss": hard[-1]["loss"],
        "losses": {record["id"]: record["loss"] for record in scored},
    })
    log.info("llm2llm: %d of %d seed examples are hard (loss >= %.4f; mean %.4f over all) -> %s", len(hard),
             len(scored), hard[-1]["loss"], sum(all_losses) / len(all_losses), out)


# ---- stage: the teacher's new instructions -------------------------------------------------------
def _write_candidates(settings: dict, hard: list[dict], teacher: str, path: str, label: str, style: PromptStyle,
                      factory: GeneratorFactory | None) -> list[dict]:
    """n raw teacher outputs per hard seed, appended as they come (a rerun after a kill generates
    only the seeds missing); each seed's outputs are sampled from a seed of its own, so batch_size
    changes nothing."""
    n = int(settings.get("n", 4))
    batch_size = max(1, int(settings.get("batch_size", 16)))
    sampling = settings["instruction_sampling"]
    base_seed = int(settings.get("seed", 0))
    generator: Generator | None = None
    with resumable_shard(path) as writer:
        for start in tqdm(range(0, len(hard), batch_size), desc=f"{label} augment", unit="batch"):
            todo = [record for record in hard[start:start + batch_size] if f"{label}-{record['id']}-c0" not in writer]
            if not todo:
                continue
            if generator is None:
                generator = factory() if factory else make_generator(settings, teacher)
            prefill = style.prefill if generator.supports_prefill else ""
            prompts = [generator.chat_prompt(augmentation_request(record["instruction"], style), prefill)
                       for record in todo]
            seeds = [derive_seed(base_seed, label, "augment", record["id"]) for record in todo]
            for record, prompt, outputs in zip(todo, prompts, generator.generate(prompts, sampling, n, seeds)):
                for c, raw in enumerate(outputs):
                    writer.append({"id": f"{label}-{record['id']}-c{c}", "group": f"{label}-{record['id']}",
                                   "from_seed": record["id"], "prompt": prompt, "prefill": prefill,
                                   "raw_output": raw})
        return list(writer.records)


def choose_augmentations(hard: list[dict], candidates: list[dict], training_instructions: list[str], filters: dict,
                         style: PromptStyle) -> tuple[list[dict], Counter]:
    """Every candidate with its verdict, and the counts by reason: hardest seed first, the first
    candidate of each seed that passes the filters is kept, its later siblings are `not_needed`."""
    by_seed: dict[str, list[dict]] = {}
    for candidate in candidates:
        by_seed.setdefault(candidate["from_seed"], []).append(candidate)
    check = FilterState(filters)   # the synthesis filters, against everything the student already trains on
    for text in training_instructions:
        check.index.add(text)
    judged, counts = [], Counter()
    for record in hard:
        kept_one = False
        for candidate in by_seed.get(record["id"], []):
            instruction, how = extract_instruction(candidate["raw_output"], candidate["prefill"], style)
            reason = "not_needed" if kept_one else check.judge(instruction, [])
            if reason is None:
                check.index.add(instruction)
                kept_one = True
            counts[reason or "kept"] += 1
            judged.append({**candidate, "instruction": instruction, "extraction": how, "kept": reason is None,
                           "reason": reason, "seed_instruction": record["instruction"], "seed_loss": record["loss"]})
    return judged, counts


def augment(settings: dict, hard: str, teacher: str, training_set: str, candidates: str, out: str, summary: str,
            generator_factory: GeneratorFactory | None = None) -> None:
    """Stage `llm2llm_augment`: the teacher writes new instructions from this round's hard seeds.

    `candidates` keeps every raw output (resumable); `out` the kept instructions, at most one per
    hard seed, as instruction records for the synthesis response stages; `summary` the counts by
    reason. Settings: label, seed, n, batch_size, instruction_sampling, prompt_style, filters and
    the generator's keys (backend, chat_template).
    """
    label = settings["label"]
    style = prompt_style(settings.get("prompt_style", "prefill"))
    hard_records = read_jsonl(hard)
    raw = _write_candidates(settings, hard_records, teacher, candidates, label, style, generator_factory)
    existing = [record["instruction"] for record in read_jsonl(training_set)]
    judged, counts = choose_augmentations(hard_records, raw, existing, settings.get("filters"), style)
    kept = [record for record in judged if record["kept"]]
    write_jsonl_atomic(out, kept)
    without = len(hard_records) - len(kept)
    write_json_atomic(summary, {"label": label, "hard_seeds": len(hard_records), "candidates": len(judged),
                                "kept": len(kept), "hard_seeds_without_new_instruction": without,
                                "by_reason": {reason: counts[reason] for reason in ("kept", *REJECTION_REASONS)}})
    if not kept:
        log.warning("%s: no candidate passed the filters; this round adds no example (see %s)", label, candidates)
    log.info("%s: %d new instructions from %d hard seeds (%d seeds got none); by reason %s", label, len(kept),
             len(hard_records), without, dict(counts))


# ---- stage: D_k ----------------------------------------------------------------------------------
def build_training_set(settings: dict, previous: str, out: str, added: str | None = None) -> None:
    """Stage `llm2llm_training_set`: D_k = D_{k-1} followed by this round's answered augmentations."""
    earlier = read_jsonl(previous)
    records = earlier + (read_jsonl(added) if added else [])
    counts = Counter(record["id"] for record in records)
    repeated = [record_id for record_id, count in counts.items() if count > 1]
    if repeated:
        raise DataError(f"{previous} and {added} share record ids {repeated[:3]}: an augmentation was added twice")
    write_jsonl_atomic(out, records)
    log.info("llm2llm training set: %d records (%d added) -> %s", len(records),
             len(records) - len(earlier), out)
