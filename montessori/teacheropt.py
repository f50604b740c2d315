"""The teacher-optimization ablation (config `teacher_optimization`, docs/methods.md).

- `dpo_instructions` (the paper, the default): DPO on instruction pairs; rules/training.smk alone.
- `dpo_responses`: the probes hold `synthesis.n` responses per instruction (montessori/synthesis.py
  `response_records`: `group` = the instruction, `prompt` = the response prompt), so the unchanged
  pairs stage pairs responses to one instruction and the unchanged DPO stage trains the teacher's
  response writing.
- `bootstrap`: no DPO; the teacher is fine-tuned by SFT on its own helpful instruction candidates
  (the chosen side of the round's preference pairs), from the verbatim generation prompt to the raw
  text it wrote. Stages `bootstrap_set` and `bootstrap_teacher` here; the teacher card they write
  is the one DPO writes, so every later stage is unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .chat import IGNORE_INDEX
from .errors import ConfigError, DataError
from .io import read_jsonl, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

TEACHER_OPTIMIZATIONS = ("dpo_instructions", "dpo_responses", "bootstrap")


def check_teacher_optimization(value: str, synthesis_n: int) -> None:
    """A ConfigError naming the key for an unknown value or a combination that cannot give pairs."""
    if value not in TEACHER_OPTIMIZATIONS:
        raise ConfigError(f"config key 'teacher_optimization': unknown value {value!r} "
                          f"(expected one of {', '.join(TEACHER_OPTIMIZATIONS)})")
    if value == "dpo_responses" and synthesis_n < 2:
        raise ConfigError("config key 'synthesis.n': teacher_optimization dpo_responses pairs responses to one "
                          f"instruction, so it needs at least 2 per instruction (synthesis.n), got {synthesis_n}")


# --- bootstrap: which candidates the teacher is fine-tuned on --------------------------------

def bootstrap_records(pairs: list[dict]) -> list[dict]:
    """The chosen side of the preference pairs, each candidate once, in pair order: {id, group,
    prompt, completion, score}. A candidate chosen against several siblings (rule sign/momentum)
    is one example, not several: repeating it would weight it by how many siblings it beat."""
    selected: dict[str, dict] = {}
    for number, pair in enumerate(pairs, start=1):
        for key in ("chosen_id", "prompt", "chosen"):
            if not isinstance(pair.get(key), str) or not pair[key]:
                raise DataError(f"preference pair {number} has no non-empty string '{key}'")
        if pair["chosen_id"] not in selected:
            selected[pair["chosen_id"]] = {"id": pair["chosen_id"], "group": pair.get("group"),
                                           "prompt": pair["prompt"], "completion": pair["chosen"],
                                           "score": pair.get("chosen_score")}
    return list(selected.values())


def build_bootstrap_set(settings: dict, pairs: str, out: str, summary: str) -> None:
    """Stage `bootstrap_set`: the round's helpful candidates (the pairs' chosen side) as SFT records."""
    pair_records = read_jsonl(pairs)
    records = bootstrap_records(pair_records)
    if not records:
        raise DataError(f"{pairs}: no preference pairs, so no helpful candidate to fine-tune the teacher on")
    write_jsonl_atomic(out, records)
    write_json_atomic(summary, {"pairs": len(pair_records), "examples": len(records),
                                "groups": len({record["group"] for record in records})})
    log.info("bootstrap set: %d helpful candidates from %d pairs -> %s", len(records), len(pair_records), out)


def verbatim_examples(data: str | os.PathLike, tokenizer, max_length: int, section: str = "dpo") -> list[dict]:
    """input_ids and labels of {prompt, completion} records, tokenized as DPO tokenizes a pair
    (`training.dpo_tokenize`: the already templated prompt verbatim, the completion closed by the
    end-of-turn token); loss on the completion only, truncated to `max_length`."""
    from .training import dpo_tokenize

    records = read_jsonl(data)
    if not records:
        raise DataError(f"{data}: no bootstrap records")
    examples, dropped = [], []
    for number, record in enumerate(records, start=1):
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise DataError(f"{data}: record {number} (id {record.get('id')!r}) has no non-empty string '{key}'")
        ids = dpo_tokenize(tokenizer, record["prompt"], record["completion"], record["completion"])
        prompt_ids, completion_ids = ids["prompt_ids"], ids["chosen_ids"]
        if len(prompt_ids) >= max_length:
            dropped.append(record.get("id", number))
            continue
        examples.append({"input_ids": (prompt_ids + completion_ids)[:max_length],
                         "labels": ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]})
    if dropped:
        log.warning("%s: %d records whose prompt alone fills max_length=%d are skipped, e.g. %s", data,
                    len(dropped), max_length, dropped[:3])
    if not examples:
        raise ConfigError(f"config key '{section}.max_length' ({max_length}): every bootstrap record's prompt "
                          f"alone fills it; raise it")
    return examples


def train_bootstrap(settings: dict, teacher: str, data: str, out_dir: str, done: str, loss_json: str,
                    loss_png: str) -> None:
    """Stage `bootstrap_teacher`: SFT of the teacher on `bootstrap_set`'s records with the `dpo`
    section's optimizer settings (lr, epochs, batches, schedule, max_length), through the
    training module's SFT trainer, resume and card code."""
    from .training import _announce, _is_main_process, _sft, write_loss_curve

    out_dir = Path(out_dir)
    record = _sft("bootstrap", "dpo", settings, teacher, data, out_dir, "wsd", encode=verbatim_examples)
    if _is_main_process():
        write_loss_curve(record, loss_json, loss_png, "teacher bootstrap SFT")
    _announce(done, out_dir, "bootstrap", record["steps"])
