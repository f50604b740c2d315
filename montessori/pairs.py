"""Preference pairs for teacher DPO from a utility signal of each probe (config `pairs.signal`).

Siblings are the `n` candidates the teacher wrote from one prompt (one `group`). With the
paper's signal, `influence`, a candidate with negative influence lowered the student's reference
loss (helpful): it is *chosen* against a harmful sibling. Rules (config `pairs.rule`):

- `sign` (the paper): every sibling with influence < 0 against every sibling with influence > 0;
- `momentum`: the same on `influence_vs_momentum`, the loss change against the step the warm-up
  moments alone would take. With the moments restored every probe step shares that momentum
  term, so under `sign` nearly every candidate can come out helpful and nothing is rejected;
- `rank`: the best sibling against the worst, when their influences differ by at least
  `pairs.min_margin` (and differ at all).

The ablation signals (docs/methods.md) have no zero that separates helpful from harmful, so
only `rank` applies to them:
- `loss`: the warm-up student's response-token loss on the probe before the step (`probe_loss`
  of the influence records); lower is better;
- `judge`: an LLM judge's 1-10 rating of the probe (`judge_score` of the probe judging stage);
  higher is better. A probe the judge gave no rating (null) takes part in no pair.

chosen/rejected are the teacher's raw outputs and the prompt is the exact chat-formatted
generation prompt, so DPO trains on the very text the teacher generated from.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DataError
from .io import iter_jsonl, read_jsonl, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

RULES = ("sign", "momentum", "rank")


@dataclass(frozen=True)
class Signal:
    """Where a signal's scores are (the record key each rule reads) and which way is better."""

    score_keys: dict[str, str]
    higher_is_better: bool
    may_be_missing: bool = False


SIGNALS = {
    "influence": Signal({"sign": "influence", "momentum": "influence_vs_momentum", "rank": "influence"},
                        higher_is_better=False),
    "loss": Signal({"rank": "probe_loss"}, higher_is_better=False),
    "judge": Signal({"rank": "judge_score"}, higher_is_better=True, may_be_missing=True),
}


def check_signal_rule(signal: str, rule: str) -> Signal:
    """The signal's description; a ConfigError naming the key for an unknown value or a rule that
    does not apply to the signal (sign and momentum split at zero influence)."""
    if signal not in SIGNALS:
        raise ConfigError(f"config key 'pairs.signal': unknown signal {signal!r} (expected one of {sorted(SIGNALS)})")
    if rule not in RULES:
        raise ConfigError(f"config key 'pairs.rule': unknown rule {rule!r} (expected one of {sorted(RULES)})")
    if rule not in SIGNALS[signal].score_keys:
        raise ConfigError(
            f"config key 'pairs.rule': rule {rule!r} does not apply to pairs.signal {signal!r}: sign and momentum "
            f"split siblings at zero influence (below 0 helpful, above 0 harmful), and a {signal} score has no "
            f"such zero; set pairs.rule: rank (best sibling against worst)")
    return SIGNALS[signal]


def _join(scores_path: Path, responses_path: Path, score_key: str,
          may_be_missing: bool) -> tuple[dict[str, list[dict]], int]:
    """(candidates by group, in probing-file order, each with its teacher output and score; the
    number left out because their score may be missing and is: null)."""
    scores: dict[str, float | None] = {}
    for number, record in enumerate(read_jsonl(scores_path), start=1):
        for key in ("id", score_key):
            if key not in record:
                raise DataError(f"{scores_path}: record {number} has no '{key}'")
        score = record[score_key]
        if not (score is None and may_be_missing) and (not isinstance(score, (int, float)) or not math.isfinite(score)):
            raise DataError(f"{scores_path}: record {number} (id {record['id']!r}) has {score_key}={score!r}")
        if record["id"] in scores:
            raise DataError(f"{scores_path}: id {record['id']!r} appears twice")
        scores[record["id"]] = None if score is None else float(score)

    groups: dict[str, list[dict]] = defaultdict(list)
    unscored = []
    missing = 0
    for number, record in enumerate(read_jsonl(responses_path), start=1):
        for key in ("id", "group", "prompt", "raw_output"):
            if key not in record:
                raise DataError(f"{responses_path}: record {number} has no '{key}'")
        if record["id"] not in scores:
            unscored.append(record["id"])
            continue
        score = scores.pop(record["id"])
        if score is None:
            missing += 1
        else:
            groups[record["group"]].append({**record, "score": score})
    if unscored:
        raise DataError(f"{len(unscored)} probing records in {responses_path} have no score in "
                        f"{scores_path}, e.g. {unscored[:5]}; rerun the job that wrote it")
    if scores:
        raise DataError(f"{len(scores)} ids in {scores_path} are not in {responses_path}, "
                        f"e.g. {sorted(scores)[:5]}")
    for group, members in groups.items():
        prompts = {member["prompt"] for member in members}
        if len(prompts) != 1:
            raise DataError(f"{responses_path}: the siblings of group {group!r} have {len(prompts)} different "
                            f"prompts; a group must come from one teacher prompt")
    if missing:
        log.warning("%d probes have no %s (null) and take part in no pair", missing, score_key)
    return groups, missing


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


def pairs_for_group(group: str, members: list[dict], rule: str, min_margin: float = 0.0,
                    higher_is_better: bool = False) -> list[dict]:
    """Preference pairs among one group's candidates (each with `id`, `prompt`, `raw_output`, `score`)."""
    if rule in ("sign", "momentum"):
        helpful = [m for m in members if m["score"] < 0]
        harmful = [m for m in members if m["score"] > 0]
        return [_pair(group, good, bad) for good in helpful for bad in harmful]
    if rule == "rank":
        if len(members) < 2:
            return []
        # min/max keep the first of equal scores: a deterministic choice in file order.
        low = min(members, key=lambda m: m["score"])
        high = max(members, key=lambda m: m["score"])
        best, worst = (high, low) if higher_is_better else (low, high)
        spread = high["score"] - low["score"]
        return [_pair(group, best, worst)] if spread > 0 and spread >= min_margin else []
    raise ConfigError(f"config key 'pairs.rule': unknown rule {rule!r} (expected one of {sorted(RULES)})")


def _no_pairs_message(rule: str, score_key: str, min_margin: float, groups: dict[str, list[dict]],
                      scores_path: Path) -> str:
    scores = [m["score"] for members in groups.values() for m in members]
    where = f"pairs.rule: {rule} found no preference pairs in {len(groups)} groups of {scores_path}"
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


def _rule_counts(scores_path: Path, responses_path: Path, signal: Signal, rule: str, min_margin: float,
                 configured: set[tuple[str, str]]) -> dict:
    """What another rule would pair from the same scores (counted, not trained on): the rules side
    by side on one run's probes. `shared`: its pairs that the configured rule also made."""
    groups, _ = _join(scores_path, responses_path, signal.score_keys[rule], signal.may_be_missing)
    found = [pairs_for_group(group, members, rule, min_margin, signal.higher_is_better)
             for group, members in groups.items()]
    pairs = [(pair["chosen_id"], pair["rejected_id"]) for group_pairs in found for pair in group_pairs]
    return {"score": signal.score_keys[rule], "groups_with_pairs": sum(bool(group_pairs) for group_pairs in found),
            "pairs": len(pairs), "shared": len(configured.intersection(pairs))}


def _other_rules(scores_path: Path, responses_path: Path, signal: Signal, rule: str, min_margin: float,
                 configured: set[tuple[str, str]]) -> dict:
    """_rule_counts for every other rule of the signal whose score the records carry (response
    pairs of teacher_optimization dpo_responses have no influence_vs_momentum)."""
    present = set(next(iter_jsonl(scores_path), {}))    # the first record's keys: every record has the same
    return {other: _rule_counts(scores_path, responses_path, signal, other, min_margin, configured)
            for other, key in signal.score_keys.items() if other != rule and key in present}


def build_pairs(settings: dict, scores: str, responses: str, out: str, summary: str) -> None:
    """Stage `preference_pairs`: settings = config `pairs` {signal, rule, min_margin}; `scores` is
    the merged influence table (signals influence and loss) or the probe judge's (signal judge)."""
    signal_name, rule = settings.get("signal", "influence"), settings.get("rule", "momentum")
    signal = check_signal_rule(signal_name, rule)
    score_key = signal.score_keys[rule]
    min_margin = float(settings.get("min_margin", 0.0))
    if min_margin < 0:
        raise ConfigError(f"config key 'pairs.min_margin' must be >= 0, got {min_margin}")
    scores_path, responses_path = Path(scores), Path(responses)
    groups, missing = _join(scores_path, responses_path, score_key, signal.may_be_missing)
    if not groups:
        raise DataError(f"{responses_path}: no scored probing records to build pairs from")

    pairs: list[dict] = []
    groups_with_pairs = 0
    for group, members in groups.items():
        found = pairs_for_group(group, members, rule, min_margin, signal.higher_is_better)
        groups_with_pairs += bool(found)
        pairs.extend(found)
    if not pairs:
        raise DataError(_no_pairs_message(rule, score_key, min_margin, groups, scores_path))

    values = [m["score"] for members in groups.values() for m in members]
    chosen_rejected = {(pair["chosen_id"], pair["rejected_id"]) for pair in pairs}
    stats = {
        "signal": signal_name,
        "rule": rule,
        "score": score_key,
        "higher_is_better": signal.higher_is_better,
        "min_margin": min_margin,
        "candidates": len(values),
        "candidates_without_score": missing,
        "candidates_negative": sum(s < 0 for s in values),
        "candidates_positive": sum(s > 0 for s in values),
        "groups": len(groups),
        "groups_with_pairs": groups_with_pairs,
        "pairs": len(pairs),
        "other_rules": _other_rules(scores_path, responses_path, signal, rule, min_margin, chosen_rejected),
    }
    write_jsonl_atomic(out, pairs)
    write_json_atomic(summary, stats)
    log.info("pairs: signal %s, rule %s gave %d pairs from %d of %d groups", signal_name, rule, len(pairs),
             groups_with_pairs, len(groups))
