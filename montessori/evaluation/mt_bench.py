"""MT-Bench: two-turn answers and single-answer grading, in FastChat `llm_judge`'s file formats.

Answer file (one JSON line per question, FastChat `gen_model_answer.py`):
    {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [str, str]}], "tstamp"}
Judgment file (FastChat `gen_judgment.py --mode single`, read by `show_result.py`):
    {"question_id", "model", "judge": [judge_name, prompt_name], "user_prompt", "judgment",
     "score", "turn", "tstamp"}    score -1 = the judge gave no rating in the required form.
Sampling temperatures per category and the categories graded against reference answers are
FastChat's (`common.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from statistics import mean

from ..data import load_rows
from ..errors import ConfigError, DataError
from ..io import write_json_atomic, write_jsonl_atomic
from ..models import model_path
from ..seeding import derive_seed
from .judges import (LOCAL_RATING_VERSION, MISSING_RATING, LocalRatingJudge, api_request_options,
                     judge_loads_a_model, parse_rating, score_with_cache)

log = logging.getLogger(__name__)

CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
NEED_REFERENCE = ("math", "reasoning", "coding")
JUDGE_PROMPTS = {(False, 1): "single-v1", (True, 1): "single-math-v1",
                 (False, 2): "single-v1-multi-turn", (True, 2): "single-math-v1-multi-turn"}


def _section(settings: dict, key: str) -> str:
    value = settings.get("mt_bench", {}).get(key)
    if not value:
        raise ConfigError(f"config key 'evaluation.mt_bench.{key}' is not set")
    return value


def read_questions(source: str, limit: int | None = None) -> list[dict]:
    """MT-Bench questions from a local JSONL file or a remote one (https://, hf://)."""
    questions = []
    for location, question in load_rows(source):
        turns = question.get("turns")
        if "question_id" not in question or not isinstance(question.get("category"), str) \
                or not isinstance(turns, list) or len(turns) != 2:
            raise DataError(f"{location}: an MT-Bench question needs question_id, category and two turns")
        questions.append(question)
    return questions[:limit] if limit else questions


def _chat_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_answers(settings: dict, student: str, out: str, name: str, generator=None) -> None:
    """Two-turn answers at FastChat's per-category temperatures (stage `eval_generate`;
    `generator`: the student's generator when the caller has one loaded).

    settings: {"seed", "backend", "chat_template", "batch_size",
               "mt_bench": {"questions", "limit", "max_new_tokens"}}
    """
    from ..generation import make_generator

    questions = read_questions(_section(settings, "questions"), settings["mt_bench"].get("limit"))
    max_new_tokens = int(settings["mt_bench"].get("max_new_tokens", 1024))
    generator = generator or make_generator(settings, student)
    answers: dict = {q["question_id"]: [] for q in questions}
    by_temperature = defaultdict(list)
    for question in questions:
        by_temperature[CATEGORY_TEMPERATURE.get(question["category"], DEFAULT_TEMPERATURE)].append(question)
    for turn in range(2):
        for temperature, group in sorted(by_temperature.items()):
            prompts = []
            for question in group:
                messages = []
                for earlier, answer in zip(question["turns"][:turn], answers[question["question_id"]]):
                    messages += [{"role": "user", "content": earlier}, {"role": "assistant", "content": answer}]
                messages.append({"role": "user", "content": question["turns"][turn]})
                prompts.append(_chat_prompt(generator.tokenizer, messages))
            log.info("mt_bench %s: turn %d, %d questions at temperature %s", name, turn + 1, len(group), temperature)
            # FastChat samples greedily below 1e-4.
            sampling = {"temperature": temperature if temperature >= 1e-4 else 0.0, "top_p": 1.0,
                        "max_new_tokens": max_new_tokens}
            outputs = generator.generate(prompts, sampling, 1,
                                         derive_seed(settings.get("seed", 0), "mt_bench", name, turn, temperature))
            for question, texts in zip(group, outputs):
                answers[question["question_id"]].append(texts[0].strip())
    records = [{
        "question_id": q["question_id"],
        "answer_id": hashlib.sha256(json.dumps([name, q["question_id"], answers[q["question_id"]]]).encode()).hexdigest()[:22],
        "model_id": name, "choices": [{"index": 0, "turns": answers[q["question_id"]]}], "tstamp": time.time(),
    } for q in questions]
    write_jsonl_atomic(out, records)
    log.info("mt_bench: wrote %d two-turn answers to %s", len(records), out)


def judge_user_prompt(template: dict, question: dict, answer_turns: list[str], reference_turns: list[str] | None,
                      turn: int) -> str:
    """FastChat `run_judge_single`'s user prompt for one turn (turn 2 shows the whole conversation)."""
    fields = {}
    if reference_turns is not None:
        fields.update(ref_answer_1=reference_turns[0], ref_answer_2=reference_turns[1])
    if turn == 2:
        fields.update(question_1=question["turns"][0], question_2=question["turns"][1],
                      answer_1=answer_turns[0], answer_2=answer_turns[1])
    else:
        fields.update(question=question["turns"][0], answer=answer_turns[0])
    return template["prompt_template"].format(**fields)


def _load_keyed(source: str, what: str) -> dict:
    keyed = {}
    for location, record in load_rows(source):
        try:
            turns = record["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{location}: {what} lacks choices[0].turns (FastChat answer format)") from None
        if "question_id" not in record or not isinstance(turns, list) or len(turns) < 2:
            raise DataError(f"{location}: {what} needs question_id and two turns")
        keyed[record["question_id"]] = record
    return keyed


class _ApiRatingJudge:
    """MT-Bench grading by an OpenAI-compatible endpoint: the judge's text, its "[[rating]]" parsed."""

    def __init__(self, judge_settings: dict):
        self.judge = judge_settings
        self.max_new_tokens = int(judge_settings.get("max_new_tokens", 2048))

    def rate(self, conversations: list[tuple[str, str]]) -> list[dict]:
        from ..openai_client import chat_completion

        results = []
        for system, user in conversations:
            response = chat_completion(
                self.judge["base_url"], self.judge["model"],
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                temperature=0.0, max_tokens=self.max_new_tokens, **api_request_options(self.judge))
            text = response["choices"][0]["message"]["content"] or ""
            results.append({"judgment": text, "score": parse_rating(text)})
        return results


def rate_with_cache(tasks: list[dict], cache: str, settings: dict, judge_card: str | None, what: str) -> dict:
    """key -> rating record ({"key", "judgment", "score", ...}) for each task ({"key", "template",
    "user"}), through the cache (`judges.score_with_cache`)."""
    def open_judge():
        judge, batch_size = make_rating_judge(settings, judge_card)
        return judge.rate, batch_size

    return score_with_cache([(task["key"], (task["template"]["system_prompt"], task["user"])) for task in tasks],
                            cache, open_judge, what)


def make_rating_judge(settings: dict, judge_card: str | None):
    """The MT-Bench judge of `evaluation.judge`, and how many judgements it is asked at once (an
    API judge one by one, so each paid answer is cached as it comes)."""
    judge_settings = settings.get("judge", {})
    if judge_loads_a_model(judge_settings):
        if not judge_card:
            raise ConfigError("config key 'evaluation.judge.type' is 'local' but no judge model card was given")
        batch_size = int(settings.get("batch_size", 8))
        return LocalRatingJudge(model_path(judge_card), settings.get("chat_template"), batch_size), batch_size
    return _ApiRatingJudge(judge_settings), 1


def rating_judge_identity(judge_settings: dict, judge_card: str | None) -> str:
    """What a rating is cached under: the local judge's weights and scoring version, or the API model."""
    if judge_loads_a_model(judge_settings):
        return f"local:{model_path(judge_card) if judge_card else None}:{LOCAL_RATING_VERSION}"
    return f"api:{judge_settings.get('model')}"  # as before, so paid judgements stay cached


def summarize_scores(judgments: list[dict], category_of: dict) -> dict:
    """Mean score per turn and overall over valid ratings (as show_result.py), with missing counts;
    `category_of` maps question_id to category."""
    valid = [j for j in judgments if j["score"] != MISSING_RATING]
    by_turn = {turn: [j["score"] for j in valid if j["turn"] == turn] for turn in (1, 2)}
    categories = defaultdict(list)
    for j in valid:
        categories[category_of[j["question_id"]]].append(j["score"])
    return {
        "turn_1": mean(by_turn[1]) if by_turn[1] else None,
        "turn_2": mean(by_turn[2]) if by_turn[2] else None,
        "overall": mean(j["score"] for j in valid) if valid else None,
        "n_judgments": len(judgments),
        "n_missing": len(judgments) - len(valid),
        "n_missing_turn_1": sum(1 for j in judgments if j["turn"] == 1 and j["score"] == MISSING_RATING),
        "n_missing_turn_2": sum(1 for j in judgments if j["turn"] == 2 and j["score"] == MISSING_RATING),
        "categories": {c: mean(s) for c, s in sorted(categories.items())},
    }


def judge_answers(settings: dict, answers: str, out: str, scores: str, cache: str, judge: str | None = None) -> None:
    """Single-answer grading 1-10 of both turns of every answer (stage `eval_judge`).

    `judge` is the judge's model card (judge type local). A local judge's score is its expected
    rating (judges.LocalRatingJudge), an API judge's the "[[rating]]" of its text. Judgements are
    appended to the JSONL `cache` keyed by (judge, system prompt, user prompt); a rerun only asks
    what is not there.

    settings: {"chat_template" (for a judge without one), "batch_size" (local judge),
               "judge": {"type", "model", "base_url", "api_key_env", "max_new_tokens" (api),
                         "request_timeout", "max_retries"},
               "mt_bench": {"questions", "reference_answers", "judge_prompts", "limit"}}
    """
    questions = {q["question_id"]: q for q in read_questions(_section(settings, "questions"))}
    answer_records = _load_keyed(answers, "answer")
    references = _load_keyed(_section(settings, "reference_answers"), "reference answer")
    prompts_path = _section(settings, "judge_prompts")
    templates = {p["name"]: p for _, p in load_rows(prompts_path) if "name" in p}
    for name in JUDGE_PROMPTS.values():
        if name not in templates:
            raise DataError(f"{prompts_path}: judge prompt {name!r} is missing")
    judge_settings = settings.get("judge", {})
    judge_name = judge_settings.get("model") or "judge"
    identity = rating_judge_identity(judge_settings, judge)

    tasks = []
    for question_id, record in answer_records.items():
        if question_id not in questions:
            raise DataError(f"{answers}: question_id {question_id} is not in {settings['mt_bench']['questions']}")
        question = questions[question_id]
        needs_reference = question["category"] in NEED_REFERENCE
        if needs_reference and question_id not in references:
            raise DataError(f"{settings['mt_bench']['reference_answers']}: no reference answer for question "
                            f"{question_id} ({question['category']})")
        reference_turns = references[question_id]["choices"][0]["turns"] if needs_reference else None
        for turn in (1, 2):
            template = templates[JUDGE_PROMPTS[(needs_reference, turn)]]
            user = judge_user_prompt(template, question, record["choices"][0]["turns"], reference_turns, turn)
            key = hashlib.sha256(json.dumps([identity, template["system_prompt"], user]).encode()).hexdigest()
            tasks.append({"question": question, "model": record["model_id"], "template": template,
                          "user": user, "turn": turn, "key": key})

    results = rate_with_cache(tasks, cache, settings, judge, "mt_bench judge")

    judgments = []
    for task in tasks:
        result = results[task["key"]]
        judgment = {
            "question_id": task["question"]["question_id"], "model": task["model"],
            "judge": [judge_name, task["template"]["name"]], "user_prompt": task["user"],
            "judgment": result["judgment"], "score": result.get("score", parse_rating(result["judgment"])),
            "turn": task["turn"], "tstamp": time.time(),
        }
        if "rating_probabilities" in result:
            judgment["rating_probabilities"] = result["rating_probabilities"]
        judgments.append(judgment)
    write_jsonl_atomic(out, judgments)
    summary = summarize_scores(judgments, {qid: q["category"] for qid, q in questions.items()})
    summary.update({"model": judgments[0]["model"] if judgments else None, "judge": identity})
    write_json_atomic(scores, summary)
    if summary["n_missing"]:
        log.warning("mt_bench: %d of %d judgments gave no [[rating]] and count as missing",
                    summary["n_missing"], summary["n_judgments"])
    log.info("mt_bench %s: turn 1 %s, turn 2 %s, overall %s", summary["model"], summary["turn_1"],
             summary["turn_2"], summary["overall"])
