"""Preference pairs for teacher DPO from the students' local data influence.

Siblings are the `n` candidates the teacher wrote from one prompt (one `group`). A candidate
with negative influence lowered the student's reference loss (helpful): it is *chosen* against
a harmful sibling. Rules (config `pairs.rule`):

- `sign` (the paper): every sibling with influence < 0 against every sibling with influence > 0;
- `momentum`: the same on `influence_vs_momentum`, the loss change against the step the warm-up
  moments alone would take. With the moments restored every probe step shares that momentum
  term, so under `sign` nearly every candidate can come out helpful and nothing is rejected;
- `rank`: the best sibling against the worst, when their influences differ by at least
  `pairs.min_margin` (and differ at all).

chosen/rejected are the teacher's raw outputs and the prompt is the exact chat-formatted
generation prompt, so DPO trains on the very text the teacher generated from.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

from .errors import ConfigError, DataError
from .io import read_jsonl, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

RULE_SCORES = {"sign": "influence", "momentum": "influence_vs_momentum", "rank": "influence"}


def _join(influence_path: Path, responses_path: Path, score_key: str) -> dict[str, list[dict]]:
    """Candidates by group, in probing-file order, each with its teacher output and score."""
    scores: dict[str, float] = {}
    for number, record in enumerate(read_jsonl(influence_path), start=1):
        for key in ("id", score_key):
            if key not in record:
                raise DataError(f"{influence_path}: record {number} has no '{key}'")
        score = record[score_key]
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{influence_path}: record {number} (id {record['id']!r}) has {score_key}={score!r}")
        if record["id"] in scores:
            raise DataError(f"{influence_path}: id {record['id']!r} appears twice")
        scores[record["id"]] = float(score)

    groups: dict[str, list[dict]] = defaultdict(list)
    unscored = []
    for number, record in enumerate(read_jsonl(responses_path), start=1):
        for key in ("id", "group", "prompt", "raw_output"):
            if key not in record:
                raise DataError(f"{responses_path}: record {number} has no '{key}'")
        if record["id"] not in scores:
            unscored.append(record["id"])
            continue
        groups[record["group"]].append({**record, "score": scores.pop(record["id"])})
    if unscored:
        raise DataError(f"{len(unscored)} probing records in {responses_path} have no score in "
                        f"{influence_path}, e.g. {unscored[:5]}; rerun the influence merge")
    if scores:
        raise DataError(f"{len(scores)} ids in {influence_path} are not in {responses_path}, "
                        f"e.g. {sorted(scores)[:5]}")
    for group, members in groups.items():
        prompts = {member["prompt"] for member in members}
        if len(prompts) != 1:
            raise DataError(f"{responses_path}: the siblings of group {group!r} have {len(prompts)} different "
                            f"prompts; a group must come from one teacher prompt")
    return groups


def _pair(group: str, chosen: dict, rejected: dict) -> dict:
    return {
        "id": f"{chosen['id']}>{rejected['id']}",
        "group": group,
        "prompt": chosen["prompt"],
        "chosen": chosen["raw_output"],
        "rejected": rejected["raw_output"],
        "chosen_id": chosen["id"],
        "rejected_id": rejected["id"],
        "chosen_score": chosen["score"],
        "rejected_score": rejected["score"],
    }


def pairs_for_group(group: str, members: list[dict], rule: str, min_margin: float = 0.0) -> list[dict]:
    """Preference pairs among one group's candidates (each with `id`, `prompt`, `raw_output`, `score`)."""
    if rule in ("sign", "momentum"):
        helpful = [m for m in members if m["score"] < 0]
        harmful = [m for m in members if m["score"] > 0]
        return [_pair(group, good, bad) for good in helpful for bad in harmful]
    if rule == "rank":
        if len(members) < 2:
            return []
        # min/max keep the first of equal scores: a deterministic choice in file order.
        best = min(members, key=lambda m: m["score"])
        worst = max(members, key=lambda m: m["score"])
        spread = worst["score"] - best["score"]
        return [_pair(group, best, worst)] if spread > 0 and spread >= min_margin else []
    raise ConfigError(f"config key 'pairs.rule': unknown rule {rule!r} (expected one of {sorted(RULE_SCORES)})")


def _no_pairs_message(rule: str, min_margin: float, groups: dict[str, list[dict]], influence: Path) -> str:
    scores = [m["score"] for members in groups.values() for m in members]
    score_key = RULE_SCORES[rule]
    where = f"pairs.rule: {rule} found no preference pairs in {len(groups)} groups of {influence}"
    if rule in ("sign", "momentum"):
        negative = sum(s < 0 for s in scores)
        positive = sum(s > 0 for s in scores)
        advice = ("set pairs.rule: momentum (influence against the momentum-only step) or rank"
                  if rule == "sign" else "set pairs.rule: rank")
        return (f"{where}: {negative} of {len(scores)} candidates have {score_key} < 0 and {positive} > 0, "
                f"and no group has both; {advice}, or probe more candidates per group (synthesis.n)")
    spreads = [max(m["score"] for m in ms) - min(m["score"] for m in ms) for ms in groups.values() if len(ms) > 1]
    largest = max(spreads, default=0.0)
    return (f"{where}: no group's best and worst sibling differ by pairs.min_margin={min_margin} "
            f"(largest spread {largest:.3g}, {len(spreads)} groups with 2+ siblings); lower pairs.min_margin, "
            f"or probe more candidates per group (synthesis.n)")


def build_pairs(settings: dict, influence: str, responses: str, out: str, summary: str) -> None:
    """Stage `preference_pairs`: settings = config `pairs` {rule, min_margin}."""
    rule = settings.get("rule", "momentum")
    if rule not in RULE_SCORES:
        raise ConfigError(f"config key 'pairs.rule': unknown rule {rule!r} (expected one of {sorted(RULE_SCORES)})")
    min_margin = float(settings.get("min_margin", 0.0))
    if min_margin < 0:
        raise ConfigError(f"config key 'pairs.min_margin' must be >= 0, got {min_margin}")
    influence_path, responses_path = Path(influence), Path(responses)
    groups = _join(influence_path, responses_path, RULE_SCORES[rule])
    if not groups:
        raise DataError(f"{responses_path}: no probing records to build pairs from")

    pairs: list[dict] = []
    groups_with_pairs = 0
    for group, members in groups.items():
        found = pairs_for_group(group, members, rule, min_margin)
        groups_with_pairs += bool(found)
        pairs.extend(found)
    if not pairs:
        raise DataError(_no_pairs_message(rule, min_margin, groups, influence_path))

    scores = [m["score"] for members in groups.values() for m in members]
    stats = {
        "rule": rule,
        "score": RULE_SCORES[rule],
        "min_margin": min_margin,
        "candidates": len(scores),
        "candidates_negative": sum(s < 0 for s in scores),
        "candidates_positive": sum(s > 0 for s in scores),
        "groups": len(groups),
        "groups_with_pairs": groups_with_pairs,
        "pairs": len(pairs),
    }
    write_jsonl_atomic(out, pairs)
    write_json_atomic(summary, stats)
    log.info("pairs: rule %s gave %d pairs from %d of %d groups", rule, len(pairs), groups_with_pairs, len(groups))
