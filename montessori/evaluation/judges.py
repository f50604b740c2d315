"""Judges: pairwise preference judges (AlpacaEval 2's weighted scheme) and MT-Bench rating judges.

`judge_type` is the one place judge types are told apart (`local`: a model the job loads; `api`:
an OpenAI-compatible endpoint, also `vllm serve`).

Pairwise: the judge sees an instruction and two outputs labelled `m` (first) and `M` (second) and
answers with the label of the better one. As in AlpacaEval 2's weighted GPT-4 Turbo annotator, the
preference is not the generated answer but the judge's next-token probability mass on `m` against
`M`: P(first) = p(m) / (p(m) + p(M)), alpaca_eval preference = 2 - P(first). An API judge *is*
that annotator (`weighted_alpaca_eval_gpt4_turbo`): its prompt, request settings and parser are
read from the installed `alpaca-eval` package at run time; a judgement where neither label is
among the top log-probabilities is missing (NaN). A local judge reads the full next-token
distribution of a causal LM after a shorter prompt of our own (a small model cannot follow the
annotator's long prompt).

MT-Bench: an API judge's "[[rating]]" is parsed from its text; a local judge scores the expected
rating under its next-token distribution over 1-10.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import warnings

from collections.abc import Callable, Sequence

from tqdm import tqdm

from ..errors import ConfigError, ModelError
from ..io import ShardWriter

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


JUDGE_TYPES = ("local", "api")


def judge_type(judge_settings: dict) -> str:
    """The one place judge types are told apart: `local` (a model the job loads) or `api` (an
    OpenAI-compatible endpoint, which must name its base_url and model)."""
    kind = judge_settings.get("type", "local")
    if kind not in JUDGE_TYPES:
        raise ConfigError(f"config key 'evaluation.judge.type': {kind!r} is not one of {', '.join(JUDGE_TYPES)}")
    if kind == "api":
        for key in ("base_url", "model"):
            if not judge_settings.get(key):
                raise ConfigError(f"config key 'evaluation.judge.{key}' must be set for judge type 'api'")
    return kind


def judge_loads_a_model(judge_settings: dict) -> bool:
    """Whether the judging job loads the judge's weights (and so needs its model card and a GPU)."""
    return judge_type(judge_settings) == "local"


def judge_id(judge_settings: dict, local_model_path: str | None = None) -> str:
    """The identity a pairwise judgement is cached under: what judged it and with which prompt."""
    if judge_loads_a_model(judge_settings):
        return f"local:{local_model_path}:{PROMPT_VERSION}"
    return f"api:{judge_settings.get('model')}@{judge_settings.get('base_url')}:{ALPACA_EVAL_ANNOTATOR}"


def api_request_options(judge_settings: dict) -> dict:
    """The client's connection settings of an API judge (they never change a judgement)."""
    return {"api_key_env": judge_settings.get("api_key_env") or "OPENAI_API_KEY", "config_key": "evaluation.judge",
            "timeout": float(judge_settings.get("request_timeout", 120.0)),
            "retries": int(judge_settings.get("max_retries", 5))}


@functools.lru_cache(maxsize=1)
def judge_model(model_dir: str):
    """A local judge's weights, loaded once per process: the AlpacaEval and MT-Bench judges of one
    `eval_judge` job share them (both only read them, in eval mode). Each keeps its own tokenizer,
    since the rating judge pads on the left."""
    from ..models import load_causal_lm

    return load_causal_lm(model_dir, "float32").eval()


class LocalPreferenceJudge:
    """A causal LM's next-token probabilities on `m` / `M` after the pairwise prompt."""

    def __init__(self, model_dir: str, chat_template: str | None = None):
        from ..models import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir, chat_template)
        self.model = judge_model(model_dir)
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


# AlpacaEval 2's annotator; its configuration, prompt and parser are read from the installed
# `alpaca-eval` package, so the judgement is the leaderboard's own.
ALPACA_EVAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"


def _alpaca_eval_modules():
    try:
        with warnings.catch_warnings():
            # alpaca-eval 0.6.6 imports the deprecated pkg_resources (hence setuptools < 82)
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            from alpaca_eval import completion_parsers, constants, utils
    except ImportError as err:
        raise ConfigError(
            f"config key 'evaluation.judge.type' is 'api': the AlpacaEval judge uses the annotator "
            f"{ALPACA_EVAL_ANNOTATOR} of the package alpaca-eval, which cannot be imported ({err}); "
            f"pip install 'alpaca-eval==0.6.6' 'setuptools<82'"
        ) from None
    return completion_parsers, constants, utils


def alpaca_eval_annotator(name: str = ALPACA_EVAL_ANNOTATOR) -> dict:
    """{"prompt_template": text, "completions_kwargs", "parser": callable, "parser_kwargs"} of an
    alpaca_eval annotator, read from the installed package's evaluators_configs."""
    completion_parsers, constants, utils = _alpaca_eval_modules()
    configs = utils.load_configs(constants.EVALUATORS_CONFIG_DIR / name)[name]
    template_path = constants.EVALUATORS_CONFIG_DIR / configs["prompt_template"]
    return {
        "prompt_template": template_path.read_text(encoding="utf-8"),
        "completions_kwargs": dict(configs.get("completions_kwargs", {})),
        "parser": getattr(completion_parsers, configs["fn_completion_parser"]),
        "parser_kwargs": dict(configs.get("completion_parser_kwargs", {})),
    }


def alpaca_eval_messages(annotator: dict, instruction: str, output_first: str, output_second: str) -> list[dict]:
    """The annotator's chat messages for one comparison, formatted by alpaca_eval's own helpers."""
    import pandas as pd

    _, _, utils = _alpaca_eval_modules()
    frame = pd.DataFrame([{"instruction": instruction, "output_1": output_first, "output_2": output_second}])
    prompts, _ = utils.make_prompts(frame, annotator["prompt_template"])
    return utils.prompt_to_chatml(prompts[0])


def parse_alpaca_eval_completion(annotator: dict, response: dict) -> tuple[float, dict]:
    """P(first) from a chat completion through the annotator's parser (alpaca_eval's
    `logprob_parser` returns the preference 2 - P(first), NaN when neither label is there)."""
    choice = (response.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs") or {}
    raw = {"top_logprobs": ((logprobs.get("content") or [{}])[0] or {}).get("top_logprobs") or []}
    if not logprobs.get("content"):
        log.warning("judge answered without log-probabilities: %s", choice)
        return math.nan, raw
    preference = float(annotator["parser"](choice, **annotator["parser_kwargs"])[0])
    return (math.nan if math.isnan(preference) else 2 - preference), raw


class ApiPreferenceJudge:
    """AlpacaEval 2's weighted GPT-4 Turbo annotator on an OpenAI-compatible endpoint: one token
    with its top log-probabilities, the annotator's prompt and parser, the configured model."""

    def __init__(self, judge_settings: dict):
        judge_type(judge_settings)
        self.settings = judge_settings
        self.annotator = alpaca_eval_annotator()
        # The model is the configured judge's (the annotator's own is gpt-4-1106-preview).
        self.request = {k: v for k, v in self.annotator["completions_kwargs"].items() if k != "model_name"}

    def judge(self, instruction: str, output_first: str, output_second: str) -> tuple[float, dict]:
        from ..openai_client import chat_completion

        response = chat_completion(
            self.settings["base_url"], self.settings["model"],
            alpaca_eval_messages(self.annotator, instruction, output_first, output_second),
            **api_request_options(self.settings), **self.request,
        )
        return parse_alpaca_eval_completion(self.annotator, response)


def make_preference_judge(judge_settings: dict, judge_model_dir: str | None, chat_template: str | None = None):
    if judge_loads_a_model(judge_settings):
        if not judge_model_dir:
            raise ConfigError("config key 'evaluation.judge.type' is 'local' but no judge model card was given")
        return LocalPreferenceJudge(judge_model_dir, chat_template)
    return ApiPreferenceJudge(judge_settings)


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


# A local MT-Bench judge's answer is started with the rating's opening brackets (small judges
# rarely end with "[[rating]]" on their own; the 135M default never did), and its rating is the
# expected value under its next-token distribution over 1-10: the most likely token alone gave
# "5" for every answer of the default, a judge that cannot tell answers apart.
LOCAL_RATING_PREFILL = "Rating: [["
LOCAL_RATING_VERSION = "expected-rating-v1"
RATINGS = tuple(range(1, 11))


def rating_distribution(p_digits: list[float], p_ten_token: float = 0.0, p_zero_after_one: float = 0.0) -> list[float]:
    """P(rating = 1..10), renormalized over the ratings, from the judge's next-token probabilities.

    `p_digits[d - 1]` is P(first token = digit d) for d = 1..9; `p_ten_token` is P("10") where "10"
    is one token (else 0); `p_zero_after_one` is P("0" | "1") where "10" is written "1" then "0".
    A "1" followed by "0" is a 10, any other "1" a 1. Empty when the judge puts no mass on a rating.
    """
    if len(p_digits) != 9:
        raise ValueError(f"expected the probabilities of the 9 digits 1-9, got {len(p_digits)}")
    weights = [p_digits[0] * (1.0 - p_zero_after_one), *p_digits[1:], p_ten_token + p_digits[0] * p_zero_after_one]
    total = sum(weights)
    if not total > 0:
        return []
    return [w / total for w in weights]


def expected_rating(distribution: list[float]) -> float | int:
    """Sum of rating x probability, or MISSING_RATING for an empty distribution."""
    if not distribution:
        return MISSING_RATING
    return sum(r * p for r, p in zip(RATINGS, distribution))


class LocalRatingJudge:
    """A causal LM's expected MT-Bench rating: its next-token distribution after the judge prompt
    and LOCAL_RATING_PREFILL, read at the rating digits (one more forward pass for "1" -> "0")."""

    def __init__(self, model_dir: str, chat_template: str | None = None, batch_size: int = 8):
        from ..models import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir, chat_template)
        self.tokenizer.padding_side = "left"
        self.model = judge_model(model_dir)
        self.batch_size = max(1, int(batch_size))
        self.digit_ids = [self._tail(str(d), model_dir, 1)[0] for d in range(1, 10)]
        ten = self._tail("10", model_dir, None)
        if len(ten) == 1:
            self.ten_id, self.zero_id = ten[0], None
        elif len(ten) == 2 and ten[0] == self.digit_ids[0]:
            self.ten_id, self.zero_id = None, ten[1]
        else:
            raise ModelError(f"judge model {model_dir}: '10' after {LOCAL_RATING_PREFILL!r} is tokenized as {ten}; "
                             f"expected one token or '1' then '0'")

    def _tail(self, text: str, model_dir: str, length: int | None) -> list[int]:
        """The token ids `text` adds after the prefill, as the judge would write them."""
        head = self.tokenizer.encode("\n" + LOCAL_RATING_PREFILL, add_special_tokens=False)
        full = self.tokenizer.encode("\n" + LOCAL_RATING_PREFILL + text, add_special_tokens=False)
        tail = full[len(head):]
        if full[:len(head)] != head or (length is not None and len(tail) != length):
            raise ModelError(f"judge model {model_dir}: the rating {text!r} after {LOCAL_RATING_PREFILL!r} is not "
                             f"{length} separate token(s) in its tokenizer; the expected-rating judge needs them")
        return tail

    def _next_token_probs(self, prompts: list[str]):
        import torch

        batch = self.tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(self.model.device)
        with torch.no_grad():
            logits = self.model(**batch).logits[:, -1].float()
        return torch.softmax(logits, dim=-1)

    def rate(self, conversations: list[tuple[str, str]]) -> list[dict]:
        """{"judgment", "score", "rating_probabilities"} per (system, user) prompt."""
        results = []
        for start in range(0, len(conversations), self.batch_size):
            prompts = [self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                tokenize=False, add_generation_prompt=True) + LOCAL_RATING_PREFILL
                for system, user in conversations[start:start + self.batch_size]]
            probs = self._next_token_probs(prompts)
            if self.zero_id is not None:
                one = self.tokenizer.decode([self.digit_ids[0]])
                p_zero = self._next_token_probs([p + one for p in prompts])[:, self.zero_id].tolist()
            else:
                p_zero = [0.0] * len(prompts)
            for row, zero in zip(probs, p_zero):
                distribution = rating_distribution(
                    [float(row[i]) for i in self.digit_ids],
                    float(row[self.ten_id]) if self.ten_id is not None else 0.0, zero)
                score = expected_rating(distribution)
                shown = ", ".join(f"{r}: {p:.3f}" for r, p in zip(RATINGS, distribution))
                results.append({
                    "judgment": f"{LOCAL_RATING_PREFILL}{score:.3f}]] (expected rating under the judge's "
                                f"next-token distribution: {shown})" if distribution else "no mass on any rating",
                    "score": score, "rating_probabilities": distribution,
                })
        return results


def score_with_cache(items: Sequence[tuple[str, object]], cache: str, open_judge: Callable[[], tuple[Callable, int]],
                     what: str) -> dict[str, dict]:
    """key -> record ({"key", **the judge's result}) for each (key, judge input) item. Records already
    in `cache` (JSONL keyed by "key") are read back; the others are judged in batches and appended as
    they come, so a rerun after a kill asks only what is missing. `open_judge()` -> (a function from a
    batch of inputs to one result dict each, the batch size) is called only when something is missing,
    so a complete cache never loads a judge."""
    with ShardWriter(cache, id_key="key") as cached:
        results = {record["key"]: record for record in cached.records}
        todo = [(key, judge_input) for key, judge_input in items if key not in results]
        log.info("%s: %d judgments, %d from the cache %s", what, len(items), len(items) - len(todo), cache)
        if todo:
            judge_batch, step = open_judge()
            for start in tqdm(range(0, len(todo), step), desc=what, unit="batch"):
                batch = todo[start:start + step]
                for (key, _), result in zip(batch, judge_batch([judge_input for _, judge_input in batch])):
                    record = {"key": key, **result}
                    cached.append(record)
                    results[key] = record
    return results
