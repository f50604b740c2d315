"""The Self-Reward baseline (Yuan et al., 2024, "Self-Rewarding Language Models", arXiv:2401.10020).

One round (= one Self-Rewarding iteration) of method `self_reward` (docs/methods.md):

1. `self_reward_candidates`: the student as the previous round left it answers each instruction
   of `R/round<k>/self_reward/train/instructions.jsonl` `self_reward.n` times (the paper's N = 4,
   sampled at T = 0.7, top-p 0.9), one seed per instruction so batching changes nothing;
2. a judge scores every candidate: `self_reward.judge: external` is the project's judge
   (`evaluation.judge`, through the probe judge stage `judge_probes`, MT-Bench's 1-10 prompt), or
   `self`: the student judges its own candidates with the Self-Rewarding paper's additive 5-point
   LLM-as-a-Judge prompt (its Figure 2, `ADDITIVE_JUDGE_PROMPT` below), stage
   `self_reward_judge`, whose score is the expected points (0-5) under the student's next-token
   distribution after "Score: " (the project's local judges score expected ratings the same way);
3. pairs: the best against the worst candidate of an instruction when their scores differ (the
   paper's rule), built by the `preference_pairs` stage with signal judge and rule rank;
4. DPO of the student on those pairs (the teacher's DPO stage, the student before as reference).

Candidate record (one per candidate, the fields `preference_pairs` and `judge_probes` read):
    {"id": "<instruction id>-c<j>", "group": <instruction id>, "instruction", "prompt" (the exact
     chat-formatted text the student continued), "raw_output", "response" (raw_output stripped)}
Self-judge score record: {"id", "group", "judge_score": float | null, "judgment"} as judge_probes.
"""

from __future__ import annotations

import hashlib
import json
import logging

from tqdm import tqdm

from .errors import ConfigError, DataError, ModelError
from .generation import Generator, make_generator
from .evaluation.judges import score_with_cache
from .io import read_jsonl, resumable_shard
from .models import model_path
from .probe_judge import write_judge_scores
from .seeding import derive_seed

log = logging.getLogger(__name__)

JUDGES = ("external", "self")

# Figure 2 of Yuan et al. (2024), verbatim but for the placeholders: the prompt the model judges
# its own responses with during Self-Rewarding training.
ADDITIVE_JUDGE_PROMPT = """Review the user's question and the corresponding response using the additive 5-point \
scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, \
even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not \
completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, \
regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found \
in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the \
user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room \
for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, \
without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and \
insightful answer.

User: {instruction}

<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate \
the response in alignment with this additive scoring model, we'll systematically attribute points based on the \
outlined criteria."""

# The paper samples the judge's justification and parses "Score: N" (averaging 3 samples). A
# local judge here writes no justification: its answer is started with the score's opening words,
# and its score is the expected points under its next-token distribution over 0-5, one forward
# pass, deterministic (the 135M default never ends with a well-formed "Score: N" on its own).
SCORE_PREFILLS = ("Score: ", "Score:")
POINTS = tuple(range(6))
SELF_JUDGE_VERSION = "self-reward-additive-expected-v1"


def check_judge(judge: str) -> str:
    if judge not in JUDGES:
        raise ConfigError(f"config key 'self_reward.judge': {judge!r} is not one of {', '.join(JUDGES)}")
    return judge


def judge_prompt(instruction: str, response: str) -> str:
    return ADDITIVE_JUDGE_PROMPT.format(instruction=instruction, response=response)


def expected_points(probabilities: list[float]) -> float | None:
    """Expected points from P(0..5 points) (renormalized over the six); None without any mass."""
    if len(probabilities) != len(POINTS):
        raise ValueError(f"expected the probabilities of the {len(POINTS)} scores 0-5, got {len(probabilities)}")
    total = sum(probabilities)
    if not total > 0:
        return None
    return sum(points * p for points, p in zip(POINTS, probabilities)) / total


def score_token_ids(tokenizer, model_dir: str) -> tuple[str, list[int]]:
    """(prefill, token id of each score 0-5 written right after it): the first of SCORE_PREFILLS
    after which every score is exactly one token that leaves the prefill's own tokens unchanged
    (tokenizers differ in whether the space before a digit is a token of its own)."""
    for prefill in SCORE_PREFILLS:
        head = tokenizer.encode("\n" + prefill, add_special_tokens=False)
        ids = []
        for points in POINTS:
            full = tokenizer.encode("\n" + prefill + ("" if prefill.endswith(" ") else " ") + str(points),
                                    add_special_tokens=False)
            if full[:len(head)] != head or len(full) != len(head) + 1:
                break
            ids.append(full[-1])
        else:
            return prefill, ids
    raise ModelError(f"judge model {model_dir}: no prefill of {SCORE_PREFILLS} is followed by each score 0-5 as "
                     f"one token in its tokenizer; the expected-score self judge needs that")


def _instruction_records(path: str) -> list[dict]:
    records = read_jsonl(path)
    if not records:
        raise DataError(f"{path}: no instructions for the student to answer")
    for number, record in enumerate(records, start=1):
        for key in ("id", "instruction"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise DataError(f"{path}: record {number} has no non-empty string '{key}'")
    return records


def generate_candidates(settings: dict, instructions: str, student: str, out: str,
                        generator: Generator | None = None) -> None:
    """Stage `self_reward_candidates`: `n` sampled answers of the student to each instruction.

    settings: {"n", "sampling", "seed", "label", "backend", "batch_size", "chat_template"}.
    Resumes after a kill: instructions whose candidates are all in the partial file are skipped.
    """
    n = int(settings.get("n", 0))
    if n < 2:
        raise ConfigError(f"config key 'self_reward.n' must be at least 2 (best against worst), got {n}")
    sampling = settings.get("sampling")
    if not sampling:
        raise ConfigError("config key 'self_reward.sampling' is required (missing from the stage settings)")
    records = _instruction_records(instructions)
    label = settings.get("label", "self_reward")
    base_seed = int(settings.get("seed", 0))
    batch_size = max(1, int(settings.get("batch_size", 16)))
    with resumable_shard(out) as writer:
        for start in tqdm(range(0, len(records), batch_size), desc=f"{label} candidates", unit="batch"):
            todo = [r for r in records[start:start + batch_size]
                    if not all(f"{r['id']}-c{j}" in writer for j in range(n))]
            if not todo:
                continue
            if generator is None:
                generator = make_generator(settings, student)
            prompts = [generator.chat_prompt(record["instruction"]) for record in todo]
            # One seed per instruction: batch_size (throughput only) does not change the candidates.
            seeds = [derive_seed(base_seed, label, "candidates", record["id"]) for record in todo]
            for record, prompt, outputs in zip(todo, prompts, generator.generate(prompts, sampling, n, seeds)):
                if len(outputs) != n:
                    raise ModelError(f"the generator returned {len(outputs)} candidates for {record['id']}, not {n}")
                for j, raw in enumerate(outputs):
                    candidate_id = f"{record['id']}-c{j}"
                    if candidate_id not in writer:
                        writer.append({"id": candidate_id, "group": record["id"], "instruction": record["instruction"],
                                       "prompt": prompt, "raw_output": raw, "response": raw.strip()})
    log.info("%s: %d candidates for %d instructions -> %s", label, n * len(records), len(records), out)


class LocalAdditiveJudge:
    """A causal LM's expected points (0-5) under the additive prompt: its next-token distribution
    after the chat-formatted prompt and the score prefill, read at the score tokens."""

    def __init__(self, model_dir: str, chat_template: str | None = None, batch_size: int = 8):
        from .models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir, chat_template)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(model_dir, "float32").eval()
        self.batch_size = max(1, int(batch_size))
        self.prefill, self.score_ids = score_token_ids(self.tokenizer, model_dir)

    def score(self, pairs: list[tuple[str, str]]) -> list[dict]:
        """{"judge_score", "judgment", "score_probabilities"} per (instruction, response)."""
        import torch

        results = []
        for start in range(0, len(pairs), self.batch_size):
            prompts = [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": judge_prompt(instruction, response)}],
                tokenize=False, add_generation_prompt=True) + self.prefill
                for instruction, response in pairs[start:start + self.batch_size]]
            batch = self.tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = self.model(**batch.to(self.model.device)).logits[:, -1].float()
            for row in torch.softmax(logits, dim=-1):
                probabilities = [float(row[i]) for i in self.score_ids]
                score = expected_points(probabilities)
                total = sum(probabilities)
                shown = ", ".join(f"{p}: {q / total:.3f}" for p, q in zip(POINTS, probabilities)) if total else ""
                results.append({
                    "judge_score": score, "score_probabilities": probabilities,
                    "judgment": f"Score: {score:.3f} (expected points under the judge's next-token distribution: "
                                f"{shown})" if score is not None else "no mass on any score",
                })
        return results


def self_judge(settings: dict, candidates: str, student: str, out: str, cache: str,
               judge_factory=None) -> None:
    """Stage `self_reward_judge`: the student scores its own candidates with the additive prompt.

    settings: {"chat_template", "batch_size"}. Scores are appended to `cache` keyed by (judge
    weights, scoring version, prompt), so a rerun after a kill scores only what is missing.
    """
    records = read_jsonl(candidates)
    if not records:
        raise DataError(f"{candidates}: no candidates to judge")
    for number, record in enumerate(records, start=1):
        for key in ("id", "group", "instruction", "response"):
            if key not in record:
                raise DataError(f"{candidates}: record {number} has no '{key}'")
    identity = f"{model_path(student)}:{SELF_JUDGE_VERSION}"
    keys = [hashlib.sha256(json.dumps([identity, judge_prompt(r["instruction"], r["response"])]).encode()).hexdigest()
            for r in records]

    def open_judge():
        judge = (judge_factory or LocalAdditiveJudge)(model_path(student), settings.get("chat_template"),
                                                      int(settings.get("batch_size", 8)))
        return judge.score, judge.batch_size

    results = score_with_cache([(key, (record["instruction"], record["response"])) for key, record in zip(keys, records)],
                               cache, open_judge, "self judge")
    scores = [{"id": record["id"], "group": record["group"], "judge_score": results[key]["judge_score"],
               "judgment": results[key]["judgment"]} for key, record in zip(keys, records)]
    write_judge_scores(out, scores, "self judge")
