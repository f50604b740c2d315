"""Teacher synthesis stages: instructions, their merge, responses, their merge, warm-up/probing split.

Shards and resume: a shard works through prompt *groups* in order. The generated examples of
group g come from what was kept before its *pool block* started (blocks of `generated_pool_refresh`
groups: block b = groups [bR, (b+1)R)), and its sampling seed is derived from (seed, label, shard,
g). Groups are generated `batch_size` at a time, never across a block boundary, and the shard stops
at the exact group whose instructions complete its quota, dropping what a batch generated after it.
So the records, and everything downstream, do not depend on `batch_size` (a throughput setting:
montessori.runtime). After a kill, replaying the records already in the shard file rebuilds
exactly the state the interrupted run had, the missing groups are generated with the same prompts
and seeds, and only the records missing from the file are appended: the result is byte-identical
to an uninterrupted run.

A shard appends to `<out>.partial` and renames it to `out` only when complete: Snakemake deletes a
job's declared output before it runs and after it fails, which would throw the finished work away.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from .errors import ConfigError, DataError
from .filters import RougeLIndex, banned_word_pattern, near_duplicate_of_any, surface_rejection
from .generation import Generator, make_generator
from .io import iter_jsonl, resumable_shard, merge_shards, read_jsonl, shard_slice, write_json_atomic, write_jsonl_atomic
from .prompts import PromptStyle, extract_instruction, instruction_request, prompt_style
from .seeding import derive_seed

log = logging.getLogger(__name__)

# Filter stages in the order they are applied; a candidate's `reason` is the first it fails.
REJECTION_REASONS = ("no_instruction", "too_short", "too_long", "banned_word", "leading_char", "near_duplicate")

DEFAULT_FILTERS = {
    "min_chars": 5, "max_chars": 400, "rouge_threshold": 0.7,
    "banned_words": ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                     "draw", "plot", "go to"],
}

GeneratorFactory = Callable[[], Generator]


def _required(settings: dict, key: str, config_key: str):
    if settings.get(key) is None:
        raise ConfigError(f"config key '{config_key}' is required (missing from the stage settings)")
    return settings[key]


def read_seed_pool(path) -> list[dict]:
    seeds = []
    for number, record in enumerate(iter_jsonl(path), start=1):
        text = record.get("text")
        if not isinstance(record.get("id"), str) or not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: record {number} needs a string 'id' and a non-empty 'text'")
        seeds.append(record)
    return seeds


class FilterState:
    """What has been kept so far (by a synthesis shard, or an LLM2LLM round), and the yield of each filter."""

    def __init__(self, filters: dict):
        filters = {**DEFAULT_FILTERS, **(filters or {})}
        self.min_chars, self.max_chars = int(filters["min_chars"]), int(filters["max_chars"])
        self.threshold = float(filters["rouge_threshold"])
        self.banned = banned_word_pattern(list(filters["banned_words"]))
        self.index = RougeLIndex(self.threshold)
        self.kept: list[tuple[str, str]] = []  # (id, instruction)
        self.counts: Counter = Counter()

    def judge(self, instruction: str | None, examples: list[str]) -> str | None:
        """The reason a candidate is rejected, or None to keep it."""
        if instruction is None:
            return "no_instruction"
        reason = surface_rejection(instruction, self.min_chars, self.max_chars, self.banned)
        if reason:
            return reason
        if near_duplicate_of_any(instruction, examples, self.threshold) or self.index.find_near_duplicate(instruction):
            return "near_duplicate"
        return None

    def record(self, record: dict) -> None:
        self.counts["generated"] += 1
        self.counts[record["reason"] or "kept"] += 1
        if record["kept"]:
            self.kept.append((record["id"], record["instruction"]))
            self.index.add(record["instruction"])

    def funnel(self) -> str:
        """Candidates left after each filter stage, as counts and fractions of those generated."""
        generated = self.counts["generated"]
        left, parts = generated, [f"generated {generated}"]
        for reason in REJECTION_REASONS:
            left -= self.counts[reason]
            parts.append(f"after {reason} {left} ({left / generated:.0%})" if generated else f"after {reason} 0")
        return ", ".join(parts)


def _build_examples(rng: random.Random, seeds: list[dict], kept: list[tuple[str, str]], n_examples: int,
                    n_generated: int) -> list[tuple[str, str]]:
    """(id, text) examples of one prompt: all seeds until enough have been generated, then a mix, shuffled."""
    if len(kept) < n_generated or n_generated == 0:
        examples = [(seed["id"], seed["text"]) for seed in rng.sample(seeds, n_examples)]
    else:
        examples = [(seed["id"], seed["text"]) for seed in rng.sample(seeds, n_examples - n_generated)]
        examples += rng.sample(kept, n_generated)
    rng.shuffle(examples)
    return examples


@dataclass(frozen=True)
class _InstructionPlan:
    """What one shard of `synth_instructions` must do, read once from its settings."""

    label: str
    shard: int
    n_shards: int
    target: int
    seed: int
    n: int
    batch_groups: int
    refresh: int      # the generated-example pool is refreshed at every multiple of this many groups
    n_examples: int
    n_generated: int
    sampling: dict
    style: PromptStyle
    max_prompts_factor: float
    quota: int        # instructions this shard keeps
    max_groups: int   # prompts tried before giving up

    @classmethod
    def from_settings(cls, settings: dict, shard: int) -> _InstructionPlan:
        n_shards = int(settings.get("shards", 1))
        target = int(_required(settings, "target", "target"))
        n_examples, n_generated = int(settings.get("prompt_examples", 8)), int(settings.get("generated_examples", 2))
        if not 0 <= n_generated <= n_examples:
            raise ConfigError("config key 'synthesis.generated_examples' must be between 0 and "
                              "synthesis.prompt_examples")
        refresh = int(settings.get("generated_pool_refresh", 16))
        if refresh < 1:
            raise ConfigError(f"config key 'synthesis.generated_pool_refresh' must be >= 1, got {refresh}")
        quota = math.ceil(target * float(settings.get("oversample", 1.5)) / n_shards)
        max_prompts_factor = float(settings.get("max_prompts_factor", 6))
        return cls(
            label=_required(settings, "label", "label"), shard=shard, n_shards=n_shards, target=target,
            seed=int(settings.get("seed", 0)), n=int(settings.get("n", 4)),
            batch_groups=max(1, int(settings.get("batch_size", 16))), refresh=refresh, n_examples=n_examples,
            n_generated=n_generated,
            sampling=_required(settings, "instruction_sampling", "synthesis.instruction_sampling"),
            style=prompt_style(settings.get("prompt_style", "prefill")), max_prompts_factor=max_prompts_factor,
            quota=quota, max_groups=math.ceil(max_prompts_factor * quota),
        )


@dataclass(frozen=True)
class _Group:
    """One teacher prompt: its examples as (id, text) and the ids of its n candidates."""

    index: int
    id: str
    examples: list[tuple[str, str]]
    candidate_ids: list[str]

    @property
    def example_texts(self) -> list[str]:
        return [text for _, text in self.examples]


def _prompt_groups(plan: _InstructionPlan, seeds: list[dict], pool: list[tuple[str, str]],
                   first_group: int) -> list[_Group]:
    """The groups of the batch starting at `first_group`: at most batch_size of them, never past the
    end of the generated-pool block (so a batch size cannot change which pool a group sees) nor past
    max_groups. Each draws its examples from its own seeded RNG."""
    block_end = (first_group // plan.refresh + 1) * plan.refresh
    groups = []
    for index in range(first_group, min(first_group + plan.batch_groups, block_end, plan.max_groups)):
        rng = random.Random(derive_seed(plan.seed, plan.label, plan.shard, index))
        group_id = f"{plan.label}-s{plan.shard}-g{index:04d}"
        examples = _build_examples(rng, seeds, pool, plan.n_examples, plan.n_generated)
        groups.append(_Group(index, group_id, examples, [f"{group_id}-c{c}" for c in range(plan.n)]))
    return groups


class _Teacher:
    """The generator, loaded only when a batch has candidates to generate (a resumed shard may have none)."""

    def __init__(self, settings: dict, card: str, factory: GeneratorFactory | None):
        self.settings, self.card, self.factory = settings, card, factory
        self.generator: Generator | None = None

    def write(self, plan: _InstructionPlan, groups: list[_Group]) -> tuple[dict[str, tuple[str, list[str]]], str]:
        """({group id: (prompt, its n outputs)}, prefill). Each group is sampled from its own seed,
        so its outputs do not depend on which groups share the generate() call."""
        if self.generator is None:
            self.generator = self.factory() if self.factory else make_generator(self.settings, self.card)
        prefill = plan.style.prefill if self.generator.supports_prefill else ""
        prompts = [self.generator.chat_prompt(instruction_request(group.example_texts, plan.style), prefill)
                   for group in groups]
        seeds = [derive_seed(plan.seed, plan.label, "generate", plan.shard, group.index) for group in groups]
        outputs = self.generator.generate(prompts, plan.sampling, plan.n, seeds)
        return {group.id: (prompt, out) for group, prompt, out in zip(groups, prompts, outputs)}, prefill


def _candidate_record(plan: _InstructionPlan, group: _Group, candidate_id: str, prompt: str, raw: str, prefill: str,
                      state: FilterState) -> dict:
    instruction, how = extract_instruction(raw, prefill, plan.style)
    reason = state.judge(instruction, group.example_texts)
    return {
        "id": candidate_id, "group": group.id, "prompt": prompt, "raw_output": raw, "instruction": instruction,
        "kept": reason is None, "reason": reason, "extraction": how, "shard": plan.shard,
        "examples": [example_id for example_id, _ in group.examples],
    }


def _record_batch(plan: _InstructionPlan, groups: list[_Group], existing: dict[str, dict], model: _Teacher,
                  state: FilterState, writer) -> int:
    """Records the batch's candidates in order, each judged against what was kept before it, until
    the quota is met (where a smaller batch would have stopped too). A group missing from the shard
    file (every group, except on a resume) is generated together with the rest of the batch.
    Returns the number of groups recorded."""
    written: dict[str, tuple[str, list[str]]] = {}
    prefill = ""
    for position, group in enumerate(groups):
        if len(state.kept) >= plan.quota:
            return position
        if group.id not in written and not all(cid in existing for cid in group.candidate_ids):
            written, prefill = model.write(plan, groups[position:])
        for c, candidate_id in enumerate(group.candidate_ids):
            record = existing.get(candidate_id)
            if record is None:
                prompt, outputs = written[group.id]
                record = _candidate_record(plan, group, candidate_id, prompt, outputs[c], prefill, state)
                writer.append(record)
            state.record(record)
    return len(groups)


def _out_of_prompts(plan: _InstructionPlan, state: FilterState, prompts_tried: int, path) -> DataError:
    return DataError(
        f"{plan.label} shard {plan.shard}: only {len(state.kept)} of {plan.quota} instructions kept after "
        f"{prompts_tried} prompts ({state.funnel()}); the teacher's outputs fail the filters: raise "
        f"'synthesis.max_prompts_factor' (now {plan.max_prompts_factor:g}) or check the rejected records "
        f"(their 'reason') in {path}"
    )


def synthesize_instructions(settings: dict, seed_pool: str, teacher: str, out: str, shard: int = 0,
                            generator_factory: GeneratorFactory | None = None) -> None:
    """Stage `synth_instructions`: one shard of teacher-written instruction candidates (all, with `reason`).

    Settings: label, target, shards, seed, n (4), batch_size (16), prompt_examples (8),
    generated_examples (2), generated_pool_refresh (16), oversample (1.5), max_prompts_factor (6),
    instruction_sampling, prompt_style ("prefill"), filters, and the generator's keys (backend,
    external_teacher, chat_template). `generator_factory` replaces the model in unit tests of the stage logic.
    """
    plan = _InstructionPlan.from_settings(settings, int(shard))
    seeds = read_seed_pool(seed_pool)
    if len(seeds) < plan.n_examples:
        raise DataError(f"{seed_pool}: {len(seeds)} seeds, fewer than synthesis.prompt_examples={plan.n_examples}")
    state = FilterState(settings.get("filters"))
    model = _Teacher(settings, teacher, generator_factory)
    log.info("synth_instructions %s shard %d/%d: keeping %d instructions (target %d over all shards), "
             "at most %d prompts", plan.label, plan.shard, plan.n_shards, plan.quota, plan.target, plan.max_groups)

    with resumable_shard(out) as writer, tqdm(total=plan.quota, desc=f"{plan.label} shard {plan.shard} kept",
                                              unit="instr") as bar:
        existing = {record["id"]: record for record in writer.records}
        if existing:
            log.info("shard %d: resuming from %d records in %s", plan.shard, len(existing), writer.path)
        next_group = 0
        pool: list[tuple[str, str]] = []  # what the current block's prompts draw their generated examples from
        while len(state.kept) < plan.quota:
            if next_group >= plan.max_groups:
                raise _out_of_prompts(plan, state, next_group, writer.path)
            if next_group % plan.refresh == 0:
                pool = list(state.kept)
            groups = _prompt_groups(plan, seeds, pool, next_group)
            kept_before = len(state.kept)
            next_group += _record_batch(plan, groups, existing, model, state, writer)
            bar.update(min(len(state.kept), plan.quota) - min(kept_before, plan.quota))
            log.info("%s shard %d: %d groups, kept %d/%d; %s", plan.label, plan.shard, next_group,
                     len(state.kept), plan.quota, state.funnel())
    log.info("%s shard %d done: %d kept; yield by filter stage: %s", plan.label, plan.shard, len(state.kept),
             state.funnel())


def _groups_in_order(records: list[dict]) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["group"], []).append(record)
    return list(groups.values())


def merge_instructions(settings: dict, shard_paths: list[str], out: str, summary: str) -> None:
    """Stage `merge_instructions`: cross-shard dedup, then whole prompt groups in shard order up to `target`.

    The cut keeps whole groups until at least `target` instructions are in, so the result may
    exceed `target` by up to n - 1: siblings stay together for the group-wise split and the
    preference pairs. Settings: target, label, rouge_threshold.
    """
    target = int(_required(settings, "target", "target"))
    label = settings.get("label", "instructions")
    threshold = float(settings.get("rouge_threshold", DEFAULT_FILTERS["rouge_threshold"]))
    if isinstance(shard_paths, str):
        shard_paths = [shard_paths]
    records = merge_shards(shard_paths)
    index = RougeLIndex(threshold)
    rejected: Counter = Counter()
    kept_per_shard: Counter = Counter()
    removed_per_shard: Counter = Counter()
    survivors = []
    for record in tqdm(records, desc=f"{label} cross-shard dedup", unit="cand"):
        if not record.get("kept"):
            rejected[record.get("reason") or "unknown"] += 1
            continue
        kept_per_shard[str(record.get("shard"))] += 1
        if index.find_near_duplicate(record["instruction"]) is not None:
            removed_per_shard[str(record.get("shard"))] += 1
            continue
        index.add(record["instruction"])
        survivors.append(record)
    if len(survivors) < target:
        raise DataError(
            f"{label}: {len(survivors)} instructions left after the cross-shard dedup of {shard_paths} "
            f"({sum(kept_per_shard.values())} kept by the shards, {sum(removed_per_shard.values())} removed as "
            f"near duplicates across shards), {target - len(survivors)} short of the target {target}; raise "
            f"'synthesis.oversample' and rerun the shards (they resume and only add what is missing)"
        )
    selected: list[dict] = []
    for group in _groups_in_order(survivors):
        if len(selected) >= target:
            break
        selected.extend(group)
    write_jsonl_atomic(out, selected)
    stats = {
        "label": label, "target": target, "generated": len(records),
        "rejected": dict(sorted(rejected.items())), "kept_per_shard": dict(sorted(kept_per_shard.items())),
        "cross_shard_removed": sum(removed_per_shard.values()),
        "cross_shard_removed_per_shard": dict(sorted(removed_per_shard.items())),
        "after_dedup": len(survivors), "written": len(selected),
        "groups": len({record["group"] for record in selected}),
        "yield": len(survivors) / len(records) if records else 0.0,
    }
    write_json_atomic(summary, stats)
    log.info("%s merged: %d candidates, %d after dedup, %d written in %d groups (rejected: %s)", label,
             len(records), len(survivors), len(selected), stats["groups"], stats["rejected"])


def response_ids(instruction_id: str, per_instruction: int) -> list[str]:
    """The ids of an instruction's responses: the instruction's own id for one response (the main
    run), `<id>-r<j>` for several (teacher_optimization dpo_responses, docs/methods.md)."""
    if per_instruction == 1:
        return [instruction_id]
    return [f"{instruction_id}-r{j}" for j in range(per_instruction)]


def _responses_per_instruction(settings: dict) -> int:
    count = settings.get("responses_per_instruction", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"config key 'synthesis.n' (responses per instruction) must be a positive integer, "
                          f"got {count!r}")
    return count


def response_records(record: dict, prompt: str, raws: list[str]) -> list[dict]:
    """An instruction's answered records. One response keeps the instruction record's fields
    (the main run). Several become a group of their own: `group` is the instruction's id, and
    `prompt`/`raw_output` are the response prompt and the raw response, the fields the preference
    pairs read, so pairs form among responses to one instruction; the instruction's own `group`,
    `prompt` and `raw_output` move to `instruction_*`."""
    ids = response_ids(record["id"], len(raws))
    answered = []
    for response_id, raw in zip(ids, raws):
        response = raw.strip()
        if len(raws) == 1:
            one = {**record, "response": response}
        else:
            one = {**record, "id": response_id, "instruction_id": record["id"], "group": record["id"],
                   "prompt": prompt, "raw_output": raw, "response": response,
                   "instruction_group": record.get("group"), "instruction_prompt": record.get("prompt"),
                   "instruction_raw_output": record.get("raw_output")}
        if response != raw:
            one["response_raw"] = raw
        answered.append(one)
    return answered


def synthesize_responses(settings: dict, instructions: str, teacher: str, out: str, shard: int = 0,
                         generator_factory: GeneratorFactory | None = None) -> None:
    """Stage `synth_responses`: the teacher answers its shard of the instructions through the chat template.

    Settings: label, shards, seed, batch_size (16), response_sampling, responses_per_instruction
    (1; several for teacher_optimization dpo_responses: one seed per instruction, each of its
    responses sampled from a seed derived from it), and the generator's keys.
    """
    shard = int(shard)
    n_shards = int(settings.get("shards", 1))
    label = settings.get("label", "responses")
    base_seed = int(settings.get("seed", 0))
    batch_size = max(1, int(settings.get("batch_size", 16)))
    per_instruction = _responses_per_instruction(settings)
    sampling = _required(settings, "response_sampling", "synthesis.response_sampling")
    records = shard_slice(read_jsonl(instructions), shard, n_shards)
    generator: Generator | None = None
    empty = 0
    with resumable_shard(out) as writer:
        if writer.done_ids:
            log.info("shard %d: resuming, %d of %d responses already in %s", shard, len(writer.done_ids),
                     len(records) * per_instruction, writer.path)

        def answered(record: dict) -> bool:
            return all(response_id in writer for response_id in response_ids(record["id"], per_instruction))

        batches = range(0, len(records), batch_size)
        for start in tqdm(batches, desc=f"{label} responses shard {shard}", unit="batch"):
            todo = records[start:start + batch_size]
            if all(answered(record) for record in todo):
                continue
            if generator is None:
                generator = generator_factory() if generator_factory else make_generator(settings, teacher)
            prompts = [generator.chat_prompt(record["instruction"]) for record in todo]
            # One seed per instruction, so batch_size (throughput only) does not change the answers.
            seeds = [derive_seed(base_seed, label, "responses", record["id"]) for record in todo]
            outputs = generator.generate(prompts, sampling, per_instruction, seeds)
            for record, prompt, raws in zip(todo, prompts, outputs):
                for one in response_records(record, prompt, raws):
                    if one["id"] in writer:
                        continue
                    empty += not one["response"]
                    writer.append(one)
            log.info("%s responses shard %d: %d/%d done", label, shard, len(writer.done_ids),
                     len(records) * per_instruction)
    if empty:
        log.warning("%s responses shard %d: %d empty responses (the teacher ended at once)", label, shard, empty)


def merge_responses(settings: dict, shard_paths: list[str], instructions: str, out: str) -> None:
    """Stage `merge_responses`: every instruction answered exactly once (or `responses_per_instruction`
    times), in the instructions' order."""
    if isinstance(shard_paths, str):
        shard_paths = [shard_paths]
    per_instruction = _responses_per_instruction(settings)
    expected = [response_id for record in read_jsonl(instructions)
                for response_id in response_ids(record["id"], per_instruction)]
    by_id = {record["id"]: record for record in merge_shards(shard_paths, expected)}
    count = write_jsonl_atomic(out, (by_id[record_id] for record_id in expected))
    log.info("merged %d responses from %d shards into %s", count, len(shard_paths), out)


def _fill(groups: list[list[dict]], size: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """Whole groups adding up to `size`, taken in the given order where they fit.

    When first fit leaves a gap r, a group of exactly r is added, or a chosen group is swapped
    for one r larger; only if neither exists is the smallest group that completes the set added
    (at most n - 1 records over).
    """
    chosen, rest, total = [], [], 0
    for group in groups:
        if total + len(group) <= size:
            chosen.append(group)
            total += len(group)
        else:
            rest.append(group)
    gap = size - total
    if gap <= 0:
        return chosen, rest
    exact = next((group for group in rest if len(group) == gap), None)
    if exact is not None:
        rest.remove(exact)
        return chosen + [exact], rest
    for position, old in enumerate(chosen):
        larger = next((group for group in rest if len(group) == len(old) + gap), None)
        if larger is not None:
            rest[rest.index(larger)] = old
            chosen[position] = larger
            return chosen, rest
    completing = [group for group in rest if len(group) > gap]
    if completing:
        smallest = min(completing, key=len)
        rest.remove(smallest)
        chosen.append(smallest)
    return chosen, rest


def split_probes(settings: dict, responses: str, warmup_out: str, probing_out: str) -> None:
    """Stage `split_probes`: whole prompt groups, shuffled with the seed, into the probing and warm-up sets.

    The probing set is filled first (its groups must stay whole for the preference pairs). Each
    set gets exactly its size when whole groups allow it (see `_fill`), otherwise at most n - 1
    records more. Settings: warmup_size, probing_size, seed.
    """
    warmup_size = int(_required(settings, "warmup_size", "probes.warmup_size"))
    probing_size = int(_required(settings, "probing_size", "probes.probing_size"))
    records = read_jsonl(responses)
    groups = _groups_in_order(records)
    random.Random(derive_seed(int(settings.get("seed", 0)), "split_probes")).shuffle(groups)
    probing, rest = _fill(groups, probing_size)
    warmup, unused = _fill(rest, warmup_size)
    n_probing, n_warmup = sum(map(len, probing)), sum(map(len, warmup))
    if n_probing < probing_size or n_warmup < warmup_size:
        raise DataError(
            f"{responses}: {len(records)} records in {len(groups)} prompt groups cannot give "
            f"probes.probing_size={probing_size} and probes.warmup_size={warmup_size} records in whole groups "
            f"(got {n_probing} and {n_warmup}); lower those keys or synthesize more probes"
        )
    write_jsonl_atomic(probing_out, [record for group in probing for record in group])
    write_jsonl_atomic(warmup_out, [record for group in warmup for record in group])
    log.info("split %d records: probing %d in %d groups, warm-up %d in %d groups, %d unused in %d groups",
             len(records), n_probing, len(probing), n_warmup, len(warmup), sum(map(len, unused)), len(unused))
