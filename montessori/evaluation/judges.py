"""Judges: a pairwise preference judge (AlpacaEval 2's weighted scheme) and MT-Bench's rating parse.

Pairwise: the judge sees an instruction and two outputs labelled `m` (first) and `M` (second) and
is asked to answer with the label of the better one. As in AlpacaEval 2's weighted GPT-4 Turbo
annotator, the preference is not the generated answer but the judge's next-token probability mass
on `m` against `M`: P(first) = p(m) / (p(m) + p(M)), alpaca_eval preference = 2 - P(first). A local
judge reads the full next-token distribution of a causal LM; an API judge (OpenAI-compatible, also
`vllm serve`) reads `top_logprobs` of one generated token, and when neither label is among them the
judgement is missing (NaN), as alpaca_eval's `logprob_parser` makes it.
"""

from __future__ import annotations

import logging
import math
import re

from ..errors import ConfigError, ModelError

log = logging.getLogger(__name__)

FIRST_LABEL, SECOND_LABEL = "m", "M"
PROMPT_VERSION = "montessori-pairwise-v1"

PAIRWISE_SYSTEM = (
    "You are a careful, impartial evaluator of AI assistants. You compare two responses to the same "
    "user instruction and decide which one serves the user better: which follows the instruction, "
    "is correct, helpful and clearly written. The order of the responses and their length must not "
    "sway you."
)

PAIRWISE_TEMPLATE = """Here is a user instruction and two candidate responses, labelled m and M.

## Instruction
{instruction}

## Response m
{output_first}

## Response M
{output_second}

Which response is better? Reply with exactly one character: m if response m is better, M if \
response M is better. Do not write anything else."""


def pairwise_messages(instruction: str, output_first: str, output_second: str) -> list[dict]:
    user = PAIRWISE_TEMPLATE.format(instruction=instruction, output_first=output_first,
                                    output_second=output_second)
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def probability_first(logprob_first: float, logprob_second: float) -> float:
    """p(m) / (p(m) + p(M)) from log-probabilities (-inf = absent); NaN when both are absent."""
    if logprob_first == -math.inf and logprob_second == -math.inf:
        return math.nan
    top = max(logprob_first, logprob_second)
    return math.exp(logprob_first - (top + math.log(math.exp(logprob_first - top) + math.exp(logprob_second - top))))


def preference_from_probability(p_first: float, switched: bool) -> float:
    """alpaca_eval preference (1 = output_1 wins, 2 = output_2 wins) from P(first shown wins)."""
    shown = 2 - p_first
    return 3 - shown if switched else shown


def judge_id(judge_settings: dict, local_model_path: str | None = None) -> str:
    """The identity a judgement is cached under: what judged it and with which prompt."""
    kind = judge_settings.get("type", "local")
    if kind == "local":
        return f"local:{local_model_path}:{PROMPT_VERSION}"
    return f"api:{judge_settings.get('model')}@{judge_settings.get('base_url')}:{PROMPT_VERSION}"


class LocalPreferenceJudge:
    """A causal LM's next-token probabilities on `m` / `M` after the pairwise prompt."""

    def __init__(self, model_dir: str, chat_template: str | None = None, device: str | None = None):
        from ..models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir, chat_template)
        self.model = load_causal_lm(model_dir, "float32", device).eval()
        self.label_ids = [self._single_token(label, model_dir) for label in (FIRST_LABEL, SECOND_LABEL)]

    def _single_token(self, label: str, model_dir: str) -> int:
        ids = self.tokenizer.encode(label, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelError(
                f"judge model {model_dir}: the label {label!r} is {len(ids)} tokens in its tokenizer; "
                f"the weighted pairwise judge needs single-token labels"
            )
        return ids[0]

    def judge(self, instruction: str, output_first: str, output_second: str) -> tuple[float, dict]:
        import torch

        prompt = self.tokenizer.apply_chat_template(
            pairwise_messages(instruction, output_first, output_second), tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        lp_first, lp_second = (float(logprobs[i]) for i in self.label_ids)
        raw = {"logprob_m": lp_first, "logprob_M": lp_second, "prompt_tokens": int(ids.shape[1])}
        return probability_first(lp_first, lp_second), raw


class ApiPreferenceJudge:
    """An OpenAI-compatible endpoint: one generated token with its top log-probabilities."""

    def __init__(self, judge_settings: dict, top_logprobs: int = 5):
        for key in ("base_url", "model"):
            if not judge_settings.get(key):
                raise ConfigError(f"config key 'evaluation.judge.{key}' must be set for judge type 'api'")
        self.settings = judge_settings
        self.top_logprobs = top_logprobs

    def judge(self, instruction: str, output_first: str, output_second: str) -> tuple[float, dict]:
        from ..openai_client import chat_completion

        response = chat_completion(
            self.settings["base_url"], self.settings["model"],
            pairwise_messages(instruction, output_first, output_second),
            api_key_env=self.settings.get("api_key_env", "OPENAI_API_KEY"), config_key="evaluation.judge",
            temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs,
        )
        return parse_top_logprobs(response)


def parse_top_logprobs(response: dict) -> tuple[float, dict]:
    """P(first) from a chat completion's first-token `top_logprobs`; NaN if neither label is there."""
    try:
        top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        top = []
    found = {entry["token"]: entry["logprob"] for entry in top if entry.get("token") in (FIRST_LABEL, SECOND_LABEL)}
    lp_first = found.get(FIRST_LABEL, -math.inf)
    lp_second = found.get(SECOND_LABEL, -math.inf)
    raw = {"top_logprobs": top}
    if not found:
        log.warning("judge answered without either label among its top log-probabilities: %s", top)
    return probability_first(lp_first, lp_second), raw


def make_preference_judge(judge_settings: dict, judge_model_dir: str | None, chat_template: str | None = None):
    kind = judge_settings.get("type", "local")
    if kind == "local":
        if not judge_model_dir:
            raise ConfigError("config key 'evaluation.judge.type' is 'local' but no judge model card was given")
        return LocalPreferenceJudge(judge_model_dir, chat_template)
    if kind == "api":
        return ApiPreferenceJudge(judge_settings)
    raise ConfigError(f"config key 'evaluation.judge.type': {kind!r} is not one of local, api")


# MT-Bench: the judge must end with "[[rating]]", a number from 1 to 10.
RATING_PATTERN = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
MISSING_RATING = -1


def parse_rating(judgment: str) -> float | int:
    """The "[[rating]]" a judge gave, or -1 (FastChat's "no score") when absent or outside 1-10.

    FastChat falls back to a single-bracket "[x]" pattern; that also matches list markers and
    citations, so a rating not given in the required form is missing rather than guessed.
    """
    match = RATING_PATTERN.search(judgment or "")
    if not match:
        return MISSING_RATING
    value = float(match.group(1))
    if not 1 <= value <= 10:
        return MISSING_RATING
    return int(value) if value.is_integer() else value
