"""AlpacaEval 2: student outputs in alpaca_eval's format, weighted pairwise judging, leaderboard metrics.

Files keep alpaca_eval's own formats so its tools read them: outputs are a JSON list of
`{"dataset", "instruction", "output", "generator"}`, annotations a JSON list with `instruction`,
`output_1` / `generator_1` (the reference), `output_2` / `generator_2` (the model), `annotator`
and `preference` (1 = reference wins, 2 = model wins, fractional = weighted, null = missing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..data import load_rows, reference_instructions
from ..errors import ConfigError, DataError
from ..io import ShardWriter, write_json_atomic
from ..models import model_path
from ..seeding import derive_seed
from .judges import judge_id, make_preference_judge, preference_from_probability
from .metrics import alpaca_eval_metrics

log = logging.getLogger(__name__)


def read_alpaca_rows(source: str | Path, need_output: bool = True) -> list[dict]:
    """alpaca_eval rows from a local JSON list or a remote file (https://, hf://); each must have
    `instruction` (and `output`)."""
    located = load_rows(str(source))
    if not located:
        raise DataError(f"{source}: no alpaca_eval rows")
    fields = ("instruction", "output") if need_output else ("instruction",)
    for location, row in located:
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise DataError(f"{location}: lacks string field(s) {missing}")
    return [row for _, row in located]


def _json_number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def select_rows(rows: list[dict], limit: int | None, reference: str | None) -> tuple[list[dict], dict]:
    """The instructions evaluated, and a record of how they were chosen.

    With `reference` (the influence reference set, when it may overlap the evaluation set), its
    instructions are left out before `limit` applies: the teacher was trained to help the student on
    exactly those, so a win there measures the reference set, not the student."""
    held_out = reference_instructions(reference) if reference else set()
    # Reference instructions are stored stripped (data.alpaca_text); AlpacaEval's are not always.
    remaining = [row for row in rows if row["instruction"].strip() not in held_out]
    selected = remaining[:limit] if limit else remaining
    record = {"in_source": len(rows), "excluded_as_reference": len(rows) - len(remaining), "evaluated": len(selected)}
    if record["excluded_as_reference"]:
        record["reason"] = ("the influence reference set holds these instructions "
                            "(influence.reference.allow_eval_contamination: true)")
    return selected, record


def generate_outputs(settings: dict, student: str, out: str, name: str, selection: str | None = None,
                     exclude: str | None = None, generator=None) -> None:
    """The student's outputs for the evaluation instructions (stage `eval_generate`, with the
    MT-Bench answers; `generator`: the student's generator when the caller has one loaded).

    `exclude`: the influence reference set, whose instructions are not evaluated (`select_rows`);
    `selection`: a JSON record of how many were evaluated and left out, for the report.
    settings: {"seed", "backend", "chat_template", "batch_size",
               "alpaca_eval": {"source", "limit", "max_new_tokens", "temperature" (0 = greedy)}}
    """
    from ..generation import make_generator

    section = settings.get("alpaca_eval", {})
    if not section.get("source"):
        raise ConfigError("config key 'evaluation.alpaca_eval.source' is not set")
    rows, chosen = select_rows(read_alpaca_rows(section["source"], need_output=False), section.get("limit"), exclude)
    if chosen["excluded_as_reference"]:
        log.warning("alpaca_eval: %d of %d instructions left out: %s", chosen["excluded_as_reference"],
                    chosen["in_source"], chosen["reason"])
    if not rows:
        raise DataError(f"{section['source']}: no instruction left to evaluate once the reference set's are out")
    generator = generator or make_generator(settings, student)
    prompts = [generator.chat_prompt(row["instruction"]) for row in rows]
    sampling = {"temperature": float(section.get("temperature", 0.0)), "top_p": 1.0,
                "max_new_tokens": int(section.get("max_new_tokens", 2048))}
    log.info("alpaca_eval: generating %d outputs for %s (%s)", len(rows), name, sampling)
    completions = generator.generate(prompts, sampling, 1, derive_seed(settings.get("seed", 0), "alpaca_eval", name))
    outputs = [{"dataset": row.get("dataset", "alpaca_eval"), "instruction": row["instruction"],
                "output": texts[0].strip(), "generator": name}
               for row, texts in zip(rows, completions)]
    write_json_atomic(out, outputs)
    if selection:
        write_json_atomic(selection, {"source": section["source"], **chosen})
    log.info("alpaca_eval: wrote %d outputs to %s", len(outputs), out)


def _cache_key(judge: str, instruction: str, output_first: str, output_second: str) -> str:
    payload = json.dumps([judge, instruction, output_first, output_second], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load_length_control(difficulty_source: str, gamed_source: str) -> tuple[pd.Series, pd.DataFrame]:
    """AlpacaEval's `instruction_difficulty.csv` (row index -> difficulty) and `df_gamed.csv` (the
    gamed baselines' annotations), from a local path or a URL (https://, hf://)."""
    tables = []
    for source, key, kwargs in ((difficulty_source, "instruction_difficulty", {"index_col": 0}),
                                (gamed_source, "gamed_annotations", {})):
        try:
            tables.append(pd.read_csv(source, **kwargs))
        except Exception as err:  # noqa: BLE001 - pandas/fsspec raise many types; the message is what matters
            raise DataError(f"{source} (config key 'evaluation.alpaca_eval.{key}'): cannot read it as CSV: {err}") from None
    difficulty, gamed = tables
    if difficulty.shape[1] != 1:
        raise DataError(f"{difficulty_source}: expected one difficulty column after the index, got {list(difficulty.columns)}")
    needed = {"index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"}
    if needed - set(gamed.columns):
        raise DataError(f"{gamed_source}: lacks column(s) {sorted(needed - set(gamed.columns))} of df_gamed.csv")
    gamed = gamed.drop(columns=["model"], errors="ignore")
    gamed["not_gamed_baseline"] = gamed["not_gamed_baseline"].astype(bool)
    return difficulty.iloc[:, 0].astype(float), gamed


def difficulties_at(difficulty: pd.Series, positions: list[int], source: str) -> list[float]:
    """The difficulty of each evaluation-set row position (alpaca_eval indexes them so)."""
    missing = [p for p in positions if p not in difficulty.index]
    if missing:
        raise DataError(f"{source}: no instruction difficulty for row(s) {missing[:5]} of the evaluation set")
    return [float(difficulty[p]) for p in positions]


def _position_bias(pairs: list[tuple[float, float]]) -> dict:
    """From (P(a wins | a shown first), P(b wins | b shown first)) per sampled comparison: how
    often the first shown output wins (0.5 = no position bias) and how often both orders agree."""
    kept = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
    return {
        "position_bias_first_rate": float(np.mean([v for pair in kept for v in pair])) if kept else None,
        # consistent: the same output wins in both orders (x > .5 and y < .5: a; x < .5 and y > .5: b)
        "position_bias_consistency": float(np.mean([(x > 0.5) == (y < 0.5) for x, y in kept])) if kept else None,
        "position_bias_n": len(kept),
    }


def judge_outputs(settings: dict, outputs: str, reference: str, annotations: str, metrics: str,
                  cache: str, judge: str | None = None, reference_name: str = "dataset") -> None:
    """Pairwise preferences of the judge against one reference, then the leaderboard metrics
    (stage `eval_judge`, once per reference in `evaluation.alpaca_eval.reference`).

    `reference` is the evaluation set (its `output` is the reference answer) or another student's
    outputs file, `reference_name` its entry in `evaluation.alpaca_eval.reference`; `judge` is the
    judge's model card (judge type local). Judgements are appended to the JSONL `cache`, keyed by
    (judge, instruction, first shown output, second shown output), so a rerun asks the judge only
    about new comparisons. Outputs of the reference's own generator draw with it by definition
    (the paper's Self-Instruct = 50%) and are not judged. `position_bias_sample` comparisons are
    also judged in the other order, and the judge's position bias reported.

    settings: {"seed", "chat_template" (for a judge without one),
               "judge": {"type", "model", "base_url", "api_key_env", "request_timeout", "max_retries"},
               "alpaca_eval": {"source", "instruction_difficulty", "gamed_annotations", "position_bias_sample"}}
    """
    judge_settings = settings.get("judge", {})
    section = settings.get("alpaca_eval", {})
    model_rows = read_alpaca_rows(outputs)
    reference_rows = {}
    for row in read_alpaca_rows(reference):
        reference_rows.setdefault(row["instruction"], row)
    absent = [row["instruction"] for row in model_rows if row["instruction"] not in reference_rows]
    if absent:
        raise DataError(f"{reference}: no reference output for {len(absent)} instruction(s) of {outputs}, "
                        f"e.g. {absent[0][:80]!r}")
    judge_path = model_path(judge) if judge else None
    identity = judge_id(judge_settings, judge_path)
    seed = settings.get("seed", 0)
    preference_judge = None
    n_cached = 0

    with ShardWriter(cache, id_key="key") as cached:
        by_key = {record["key"]: record for record in cached.records}

        def p_first_shown(instruction: str, first: str, second: str) -> float:
            nonlocal preference_judge, n_cached
            key = _cache_key(identity, instruction, first, second)
            if key in by_key:
                n_cached += 1
            else:
                if preference_judge is None:
                    preference_judge = make_preference_judge(judge_settings, judge_path, settings.get("chat_template"))
                p_first, raw = preference_judge.judge(instruction, first, second)
                by_key[key] = {"key": key, "judge": identity, "p_first": _json_number(p_first), "raw": raw}
                # each judgement is on disk as soon as it is made: a failure later loses none
                cached.append(by_key[key])
            value = by_key[key]["p_first"]
            return math.nan if value is None else value

        annotated, judged = [], []
        for row in tqdm(model_rows, desc="alpaca_eval judge", unit="pair"):
            ref = reference_rows[row["instruction"]]
            # The order shown to the judge is a coin flip seeded by the comparison itself, so a rerun
            # (and the cache) sees the same order for the same pair.
            switched = derive_seed(seed, "alpaca_eval_order", row["instruction"], ref["output"], row["output"]) % 2 == 1
            first, second = (row["output"], ref["output"]) if switched else (ref["output"], row["output"])
            own_generator = (row.get("generator") is not None and row.get("generator") == ref.get("generator")
                             and row["output"] == ref["output"])
            if own_generator:
                preference, raw = 1.5, "draw by definition: the reference's own generator"
            else:
                p_first = p_first_shown(row["instruction"], first, second)
                preference = None if math.isnan(p_first) else preference_from_probability(p_first, switched)
                raw = by_key[_cache_key(identity, row["instruction"], first, second)]["raw"]
            annotated.append({
                "dataset": row.get("dataset", ref.get("dataset")), "instruction": row["instruction"],
                "output_1": ref["output"], "generator_1": ref.get("generator", "reference"),
                "output_2": row["output"], "generator_2": row.get("generator", "model"),
                "annotator": identity, "preference": preference, "is_switched_outputs": switched,
                "raw_completion": raw,
            })
            if not own_generator:
                judged.append((row, annotated[-1]))

        sample_size = min(int(section.get("position_bias_sample") or 0), len(judged))
        sample = sorted(judged, key=lambda pair: derive_seed(seed, "position_bias", pair[0]["instruction"]))[:sample_size]
        bias_pairs = []
        for row, ann in sample:
            shown = ann["output_2"] if ann["is_switched_outputs"] else ann["output_1"]
            other = ann["output_1"] if ann["is_switched_outputs"] else ann["output_2"]
            bias_pairs.append((p_first_shown(row["instruction"], shown, other),
                               p_first_shown(row["instruction"], other, shown)))
    log.info("alpaca_eval: %d comparisons (+%d in the other order), %d from the cache %s",
             len(annotated), len(bias_pairs), n_cached, cache)
    write_json_atomic(annotations, annotated)

    difficulty = gamed = None
    if section.get("instruction_difficulty") or section.get("gamed_annotations"):
        if not (section.get("instruction_difficulty") and section.get("gamed_annotations")):
            raise ConfigError("config keys 'evaluation.alpaca_eval.instruction_difficulty' and '.gamed_annotations': "
                              "length_controlled_v1 needs both (set neither for length_controlled_minimal)")
        by_index, gamed = load_length_control(section["instruction_difficulty"], section["gamed_annotations"])
        if not section.get("source"):
            raise ConfigError("config key 'evaluation.alpaca_eval.source' is not set")
        position = {}
        for index, row in enumerate(read_alpaca_rows(section["source"], need_output=False)):
            position.setdefault(row["instruction"], index)
        if len(position) > len(by_index) or any(row["instruction"] not in position for row in annotated):
            raise ConfigError(f"config key 'evaluation.alpaca_eval.instruction_difficulty': its {len(by_index)} "
                              f"difficulties are for the AlpacaEval set, and 'evaluation.alpaca_eval.source' is "
                              f"not that set in its order")
        difficulty = difficulties_at(by_index, [position[row["instruction"]] for row in annotated],
                                     section["instruction_difficulty"])

    result = {key: _json_number(value) for key, value in
              alpaca_eval_metrics(annotated, instruction_difficulty=difficulty, gamed=gamed).items()}
    result.update({
        "generator": annotated[0]["generator_2"], "reference": reference_name,
        "reference_generator": annotated[0]["generator_1"],
        "annotator": identity, "n_missing": sum(row["preference"] is None for row in annotated),
        "avg_length": sum(len(row["output_2"]) for row in annotated) / len(annotated),
        **_position_bias(bias_pairs),
    })
    write_json_atomic(metrics, result)
    log.info("alpaca_eval %s vs %s: win rate %s, %s %s", result["generator"], result["reference_generator"],
             result["win_rate"], result["length_control"],
             result.get("length_controlled_winrate", result.get("length_controlled_minimal")))
