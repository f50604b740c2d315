"""The project's own data files under data/: they parse, follow their formats, and stay disjoint.

The reference set drives the influence step; if it shares prompts with an evaluation set, the
teacher is optimized toward the test items, so that disjointness is checked here as well.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from montessori.data import load_pairs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MT_BENCH = DATA / "eval" / "mt_bench"
MT_BENCH_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
REFERENCE_CATEGORIES = {"math", "reasoning", "coding"}  # the ones FastChat grades against a reference
SINGLE_JUDGE_PROMPTS = {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
# Jaccard of content-word sets at or above which two instructions count as near-duplicates.
NEAR_DUPLICATE_JACCARD = 0.5
# Left out of the overlap: short questions share them ("what is the difference between ...")
# whatever their topic.
STOPWORDS = frozenset(
    "a an and are as at be between by can do does for from give how i in is it me my of on or "
    "the this to was what when where which who why with write you your".split())
# Word n-gram length treated as copied text when comparing the judge prompts with FastChat's.
COPIED_NGRAM = 8


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        assert line.strip(), f"{path}:{line_no}: blank line"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path}:{line_no}: not a JSON object"
        rows.append(row)
    return rows


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - STOPWORDS


def _jaccard(a: str, b: str) -> float:
    ta, tb = _tokens(a), _tokens(b)
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def _assert_no_exact_duplicates(texts: list[str], where: str) -> None:
    repeated = [t for t, n in Counter(_normalized(t) for t in texts).items() if n > 1]
    assert not repeated, f"{where}: duplicate instructions {repeated}"


def _placeholders(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", re.sub(r"\{[a-z0-9_]+\}", " ", text.lower()))
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def seeds() -> list[dict]:
    return _jsonl(DATA / "seeds.jsonl")


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return _jsonl(DATA / "reference.jsonl")


@pytest.fixture(scope="module")
def alpaca_eval() -> list[dict]:
    rows = json.loads((DATA / "eval" / "alpaca_eval.json").read_text(encoding="utf-8"))
    assert isinstance(rows, list)
    return rows


@pytest.fixture(scope="module")
def mt_questions() -> list[dict]:
    return _jsonl(MT_BENCH / "question.jsonl")


@pytest.fixture(scope="module")
def local_qa() -> list[dict]:
    return _jsonl(DATA / "eval" / "lm_eval" / "local_qa.jsonl")


def test_seeds_are_alpaca_rows_of_the_right_shape(seeds):
    assert len(seeds) >= 120
    for i, row in enumerate(seeds):
        assert set(row) == {"instruction", "input", "output"}, f"seeds line {i + 1}: fields {sorted(row)}"
        assert all(isinstance(row[k], str) for k in row), f"seeds line {i + 1}: non-string field"
        assert 5 <= len(row["instruction"]) <= 300, f"seeds line {i + 1}: instruction length"
        assert row["output"].strip(), f"seeds line {i + 1}: empty output"
    with_input = sum(1 for row in seeds if row["input"].strip())
    assert 0.15 <= with_input / len(seeds) <= 0.35, f"{with_input} of {len(seeds)} seeds have an input"


def test_seeds_hold_no_banned_words(seeds):
    """The synthesis filter's banned words (config.yaml) would drop a generated instruction; a seed
    that contains one teaches the teacher exactly what gets filtered away."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    banned = config["synthesis"]["filters"]["banned_words"]
    assert banned, "config.yaml synthesis.filters.banned_words is empty"
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in banned) + r")\b", re.IGNORECASE)
    hits = [(i + 1, field, m.group(0)) for i, row in enumerate(seeds)
            for field in ("instruction", "input", "output") if (m := pattern.search(row[field]))]
    assert not hits, f"banned words in data/seeds.jsonl (line, field, word): {hits}"


def test_seeds_have_no_duplicates_or_near_duplicates(seeds):
    texts = [f"{row['instruction']} {row['input']}".strip() for row in seeds]
    _assert_no_exact_duplicates(texts, "data/seeds.jsonl")
    close = [(a, b) for a, b in combinations(texts, 2) if _jaccard(a, b) >= NEAR_DUPLICATE_JACCARD]
    assert not close, f"near-duplicate seeds: {close}"


def test_reference_set_loads_as_pairs(reference):
    assert len(reference) == 40
    assert [row["id"] for row in reference] == [f"ref-{i:03d}" for i in range(40)]
    for row in reference:
        assert set(row) == {"id", "instruction", "response"}, f"{row['id']}: fields {sorted(row)}"
        assert row["instruction"].strip() and row["response"].strip(), row["id"]
    _assert_no_exact_duplicates([row["instruction"] for row in reference], "data/reference.jsonl")
    pairs = load_pairs(str(DATA / "reference.jsonl"))
    assert [p["id"] for p in pairs] == [row["id"] for row in reference]


def test_alpaca_eval_set_has_alpaca_eval_fields(alpaca_eval):
    assert len(alpaca_eval) == 24
    for i, row in enumerate(alpaca_eval):
        assert set(row) == {"dataset", "instruction", "output", "generator"}, f"row {i}: fields {sorted(row)}"
        assert row["dataset"] == "montessori_local" and row["generator"] == "montessori_reference", f"row {i}"
        assert row["instruction"].strip() and row["output"].strip(), f"row {i}: empty text"
    _assert_no_exact_duplicates([row["instruction"] for row in alpaca_eval], "data/eval/alpaca_eval.json")


def test_mt_bench_questions_cover_each_category_once(mt_questions):
    assert [q["question_id"] for q in mt_questions] == list(range(1001, 1001 + len(mt_questions)))
    assert Counter(q["category"] for q in mt_questions) == Counter(MT_BENCH_CATEGORIES)
    for q in mt_questions:
        assert len(q["turns"]) == 2 and all(t.strip() for t in q["turns"]), q["question_id"]
    _assert_no_exact_duplicates([t for q in mt_questions for t in q["turns"]], "mt_bench/question.jsonl")


def test_mt_bench_reference_answers_follow_fastchat(mt_questions, shared_data):
    answers = _jsonl(MT_BENCH / "reference_answer.jsonl")
    fastchat = _jsonl(shared_data / "mt_bench" / "reference_answer" / "gpt-4.jsonl")[0]
    needing = {q["question_id"] for q in mt_questions if q["category"] in REFERENCE_CATEGORIES}
    assert {a["question_id"] for a in answers} == needing
    for answer in answers:
        assert set(answer) == set(fastchat), f"{answer['question_id']}: fields {sorted(answer)}"
        assert set(answer["choices"][0]) == set(fastchat["choices"][0])
        turns = answer["choices"][0]["turns"]
        assert len(turns) == 2 and all(t.strip() for t in turns), answer["question_id"]


def test_judge_prompts_match_fastchat_names_fields_and_placeholders(shared_data):
    ours = {p["name"]: p for p in _jsonl(MT_BENCH / "judge_prompts.jsonl")}
    fastchat = {p["name"]: p for p in _jsonl(shared_data / "mt_bench" / "judge_prompts.jsonl")}
    assert SINGLE_JUDGE_PROMPTS <= set(ours)
    assert set(ours) <= set(fastchat)
    for name, prompt in ours.items():
        theirs = fastchat[name]
        assert set(prompt) == set(theirs), f"{name}: fields {sorted(prompt)}"
        assert prompt["type"] == theirs["type"] and prompt["output_format"] == theirs["output_format"], name
        for key in ("system_prompt", "prompt_template"):
            assert _placeholders(prompt[key]) == _placeholders(theirs[key]), f"{name}.{key}: placeholders"
        # FastChat fills the template with str.format: a stray brace would raise here.
        filled = prompt["prompt_template"].format(**{f: f"<{f}>" for f in _placeholders(prompt["prompt_template"])})
        assert all(f"<{f}>" in filled for f in _placeholders(prompt["prompt_template"])), name
        instructions = prompt["system_prompt"] + prompt["prompt_template"]
        required = "[[rating]]" if prompt["type"] == "single" else "[[A]]"
        assert required in instructions, f"{name}: the judge is never told the {required} form"


def test_judge_prompts_are_not_copied_from_fastchat(shared_data):
    fastchat_text = " ".join(p["system_prompt"] + " " + p["prompt_template"]
                             for p in _jsonl(shared_data / "mt_bench" / "judge_prompts.jsonl"))
    fastchat_ngrams = _ngrams(fastchat_text, COPIED_NGRAM)
    for prompt in _jsonl(MT_BENCH / "judge_prompts.jsonl"):
        shared = _ngrams(prompt["system_prompt"] + " " + prompt["prompt_template"], COPIED_NGRAM) & fastchat_ngrams
        assert not shared, f"{prompt['name']}: wording copied from FastChat: {sorted(shared)[:3]}"


def test_local_qa_is_balanced_four_way_multiple_choice(local_qa):
    assert len(local_qa) == 24
    assert [row["id"] for row in local_qa] == [f"qa-{i:02d}" for i in range(24)]
    for row in local_qa:
        assert set(row) == {"id", "question", "choices", "answer"}, f"{row['id']}: fields {sorted(row)}"
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row["id"]
        assert row["answer"] in range(4), row["id"]
    counts = Counter(row["answer"] for row in local_qa)
    assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1, counts
    _assert_no_exact_duplicates([row["question"] for row in local_qa], "lm_eval/local_qa.jsonl")


def _assert_held_out(rows: list[dict], others: list[str], what: str) -> None:
    """No row's instruction equals (normalized) or nearly equals (word Jaccard) one of `others`."""
    others_exact = {_normalized(t) for t in others}
    for row in rows:
        assert _normalized(row["instruction"]) not in others_exact, f"{row['id']} is {what}"
        close = [t for t in others if _jaccard(row["instruction"], t) >= NEAR_DUPLICATE_JACCARD]
        assert not close, f"{row['id']} {row['instruction']!r} is close to {close} ({what})"


def test_reference_set_is_disjoint_from_every_evaluation_set(reference, alpaca_eval, mt_questions, local_qa):
    evaluation = ([row["instruction"] for row in alpaca_eval] + [t for q in mt_questions for t in q["turns"]]
                  + [row["question"] for row in local_qa])
    _assert_held_out(reference, evaluation, "an evaluation item")


def test_readme_lists_every_data_file():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    files = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.name != "README.md")
    missing = [f for f in files if f"`{f}`" not in readme]
    assert not missing, f"data/README.md does not list {missing}"


def test_nll_set_is_held_out_of_seeds_reference_and_evaluation_sets(seeds, reference, alpaca_eval, mt_questions,
                                                                    local_qa):
    items = load_pairs(str(DATA / "eval" / "nll.jsonl"))
    assert len({item["id"] for item in items}) == len(items) >= 20
    _assert_no_exact_duplicates([item["instruction"] for item in items], "eval/nll.jsonl")
    others = ([row["instruction"] for row in seeds] + [row["instruction"] for row in reference]
              + [row["instruction"] for row in alpaca_eval] + [t for q in mt_questions for t in q["turns"]]
              + [row["question"] for row in local_qa])
    _assert_held_out(items, others, "a seed, reference or evaluation item")
    for item in items:
        assert len(item["response"]) >= 200, f"{item['id']}: a held-out answer should be a full, careful answer"
