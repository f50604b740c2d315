"""Filters: length, banned words, leading character, and ROUGE-L equal to the rouge-score package."""

from __future__ import annotations

import json
import random

import pytest
from rouge_score import rouge_scorer

from montessori.filters import (RougeLIndex, banned_word_pattern, lcs_length, near_duplicate_of_any,
                                rouge_l_fmeasure, rouge_tokenize, surface_rejection)

BANNED = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
          "go to"]
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_f(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def alpaca_texts(shared_data) -> list[str]:
    rows = json.loads((shared_data / "seeds" / "alpaca_gpt4_demo_1k.json").read_text())
    return [row["instruction"] + (" " + row["input"] if row["input"] else "") for row in rows]


def reject(text: str) -> str | None:
    return surface_rejection(text, 5, 400, banned_word_pattern(BANNED))


@pytest.mark.parametrize("text, reason", [
    ("Hi!", "too_short"),
    ("Name", "too_short"),
    ("Name a fruit.", None),
    ("x" * 400, None),
    ("x" * 401, "too_long"),
    ("Describe the image below.", "banned_word"),
    ("DRAW a cat in ASCII.", "banned_word"),
    ("Plot the values over time.", "banned_word"),
    ("Tell me where to go to eat tonight.", "banned_word"),
    ("Explain the mapping between two sets.", None),   # "map" only as a whole word
    ("Write a profile of a graphic designer.", None),  # "graph" only as a whole word
    ("Explain how plotters work.", None),
    ("- Write a list of chores.", "leading_char"),
    ('"Quote" a famous author.', "leading_char"),
    ("¿Qué hora es? Translate this.", "leading_char"),
    ("Écris une phrase en français.", "leading_char"),
    ("3 reasons to learn Python: list them.", None),
])
def test_surface_filters(text, reason):
    assert reject(text) == reason


def test_tokenizer_matches_rouge_score():
    from rouge_score import tokenizers

    reference = tokenizers.DefaultTokenizer(use_stemmer=False)
    for text in ["Hello, World! It's 2024.", "naïve café — Ünïcode İstanbul", "a_b-c/d", "   ", "ÀÉÎ ß ﬁ"]:
        assert rouge_tokenize(text) == reference.tokenize(text)


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 70))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 70))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
        assert lcs_length(a, b) == table[-1][-1]


def test_rouge_l_equals_rouge_score_on_random_text():
    rng = random.Random(1)
    words = ["the", "a", "cat", "Dog", "sat", "on", "mat", "of", "and", "42", "x-ray", "é"]
    for _ in range(2000):
        target = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 25)))
        prediction = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 25)))
        assert rouge_l_fmeasure(target, prediction) == reference_f(target, prediction)


def test_rouge_l_equals_rouge_score_on_alpaca(shared_data):
    texts = alpaca_texts(shared_data)
    rng = random.Random(2)
    for _ in range(1500):
        target, prediction = rng.choice(texts), rng.choice(texts)
        assert rouge_l_fmeasure(target, prediction) == reference_f(target, prediction)


def brute_force_keep(candidates: list[str], threshold: float) -> list[bool]:
    kept, decisions = [], []
    for candidate in candidates:
        duplicate = any(reference_f(other, candidate) > threshold for other in kept)
        decisions.append(not duplicate)
        if not duplicate:
            kept.append(candidate)
    return decisions


def perturbed(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.randrange(0, 4)):
        if words:
            words[rng.randrange(len(words))] = rng.choice(["new", "other", "Some", "two"])
    return " ".join(words)


@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_index_decisions_equal_rouge_score_all_pairs(shared_data, threshold):
    texts = alpaca_texts(shared_data)
    rng = random.Random(3)
    # Real instructions with near copies mixed in, so both decisions occur often.
    candidates = []
    for text in texts[:250]:
        candidates.append(text)
        if rng.random() < 0.4:
            candidates.append(perturbed(rng, rng.choice(candidates)))
    expected = brute_force_keep(candidates, threshold)
    index = RougeLIndex(threshold)
    decisions = []
    for candidate in candidates:
        keep = index.find_near_duplicate(candidate) is None
        decisions.append(keep)
        if keep:
            index.add(candidate)
    assert decisions == expected
    assert 0 < expected.count(False) < len(expected) // 2
    # the bag-of-words bound spares most exact comparisons
    assert index.exact_comparisons < len(candidates) * len(index) / 20


def test_index_reports_the_matching_text_and_score_at_the_threshold():
    index = RougeLIndex(0.5)
    index.add("one two three four")
    # F = 2 * 2 / (4 + 4) = 0.5 exactly: not above the threshold, kept
    assert index.find_near_duplicate("one two five six") is None
    found = index.find_near_duplicate("one two three six")
    assert found is not None and found[0] == 0 and found[1] == pytest.approx(0.75)
    assert index.find_near_duplicate("!!! ???") is None  # no tokens, F = 0 as in rouge-score


def test_examples_of_the_prompt_count_as_near_duplicates():
    examples = ["Write a poem about the sea.", "List three prime numbers."]
    assert near_duplicate_of_any("Write a poem about the sea!", examples, 0.7) == (0, 1.0)
    assert near_duplicate_of_any("Explain how tides work.", examples, 0.7) is None
