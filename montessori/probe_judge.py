"""Stage `judge_probes`: an LLM judge's 1-10 rating of every probing pair, the `judge` utility
signal of `pairs.signal` (docs/methods.md).

The judge is the project's (config `evaluation.judge`), asked MT-Bench's single-answer grading
prompt `single-v1` of `evaluation.mt_bench.judge_prompts` with the probe's instruction as the
question and its response as the answer: a local judge's score is its expected rating under its
next-token distribution, an API judge's the "[[rating]]" of its text (the MT-Bench judges of
evaluation/mt_bench.py). A probe the judge gave no rating has `judge_score` null and takes part
in no preference pair. Ratings are appended to a cache keyed by (judge, prompt), so a rerun after
a kill asks only what is missing.

Output record: {"id", "group", "judge_score": float | null, "judgment"}.
"""

from __future__ import annotations

import hashlib
import json
import logging

from .data import load_rows
from .errors import ConfigError, DataError
from .evaluation.judges import MISSING_RATING
from .evaluation.mt_bench import judge_user_prompt, rate_with_cache, rating_judge_identity
from .io import read_jsonl, write_jsonl_atomic

log = logging.getLogger(__name__)

PROBE_PROMPT = "single-v1"


def _template(settings: dict) -> dict:
    source = settings.get("mt_bench", {}).get("judge_prompts")
    if not source:
        raise ConfigError("config key 'evaluation.mt_bench.judge_prompts' is not set (the probe judge's prompt)")
    for _, prompt in load_rows(source):
        if prompt.get("name") == PROBE_PROMPT:
            return prompt
    raise DataError(f"{source}: judge prompt {PROBE_PROMPT!r} is missing (config key "
                    f"'evaluation.mt_bench.judge_prompts')")


def judge_probes(settings: dict, probing: str, out: str, cache: str, judge: str | None = None) -> None:
    """settings: {"chat_template" (for a judge without one), "batch_size" (local judge),
                  "judge": config `evaluation.judge`, "mt_bench": {"judge_prompts"}}"""
    records = read_jsonl(probing)
    for number, record in enumerate(records, start=1):
        for key in ("id", "group", "instruction", "response"):
            if key not in record:
                raise DataError(f"{probing}: record {number} has no '{key}'")
    if not records:
        raise DataError(f"{probing}: no probing records to judge")
    template = _template(settings)
    identity = rating_judge_identity(settings.get("judge", {}), judge)
    tasks = []
    for record in records:
        user = judge_user_prompt(template, {"turns": [record["instruction"]]}, [record["response"]], None, 1)
        key = hashlib.sha256(json.dumps([identity, template["system_prompt"], user]).encode()).hexdigest()
        tasks.append({"record": record, "template": template, "user": user, "key": key})

    results = rate_with_cache(tasks, cache, settings, judge, "probe judge")

    scored = []
    for task in tasks:
        score = results[task["key"]]["score"]
        scored.append({"id": task["record"]["id"], "group": task["record"]["group"],
                       "judge_score": None if score == MISSING_RATING else score,
                       "judgment": results[task["key"]]["judgment"]})
    write_judge_scores(out, scored, "probe judge")


def write_judge_scores(out: str, scored: list[dict], what: str) -> None:
    """The scores file ({"id", "group", "judge_score" (None: no rating), "judgment"} per record) that
    the pairs stage reads with pairs.signal judge; the unrated ones are counted in the log."""
    write_jsonl_atomic(out, scored)
    rated = [r["judge_score"] for r in scored if r["judge_score"] is not None]
    if len(rated) < len(scored):
        log.warning("%s: %d of %d records got no rating", what, len(scored) - len(rated), len(scored))
    log.info("%s: %d records rated, mean %s -> %s", what, len(rated),
             f"{sum(rated) / len(rated):.3f}" if rated else None, out)
