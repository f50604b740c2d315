"""Filters for teacher-written instructions: length, banned words, leading character, near duplicates.

The near-duplicate filter gives exactly the decisions of the `rouge-score` package
(`rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)`, F-measure > threshold) without its cost:

* Tokens: the package's default tokenizer without stemming (lowercase, every run of characters
  outside [a-z0-9] becomes a space, split). Each kept instruction is tokenized once and its
  tokens are mapped to integer ids.
* Score: ROUGE-L F = 2 * LCS / (len_a + len_b), computed with the package's own float formula
  (precision, recall, then their harmonic mean) so that ties at the threshold fall the same way.
* LCS: the bit-parallel algorithm of Hyyrö (2004): one pass over the kept instruction with Python
  integers as bit vectors, O(len_b) big-integer operations instead of a len_a x len_b table.
* Pruning: LCS can never exceed the bag-of-tokens overlap sum_t min(count_a(t), count_b(t)). An
  inverted index (token id -> kept ids and counts, numpy arrays) gives that overlap against every
  kept instruction in a few vectorized operations; only the pairs whose bound could pass the
  threshold get an exact LCS. Near 0.7, that is a tiny fraction of the kept set.
* Incremental: a candidate is checked against what is kept so far and added if it is kept;
  nothing is recomputed, no process pool.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")

# Float guard for the pruning bound: the bound is compared in exact rational arithmetic, and a
# pair within this margin of the threshold always gets its exact score.
_BOUND_MARGIN = 1e-9


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's default tokenizer (no stemmer), step for step."""
    text = _NON_ALPHANUM.sub(" ", text.lower())
    return [token for token in _SPACES.split(text) if _VALID_TOKEN.match(token)]


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict = {}
    for position, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << position)
    return _lcs_with_masks(masks, len(a), b)


def _lcs_with_masks(masks: dict, length_a: int, b: list) -> int:
    full = (1 << length_a) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        if u:
            v = ((v + u) | (v - u)) & full
    return length_a - v.bit_count()


def rouge_l_fmeasure_from_lcs(lcs: int, length_target: int, length_prediction: int) -> float:
    """The rouge-score package's F-measure, with its exact float operations."""
    if not length_target or not length_prediction:
        return 0.0
    precision = lcs / length_prediction
    recall = lcs / length_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_fmeasure(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of two texts, equal to rouge-score's `score(target, prediction)["rougeL"].fmeasure`."""
    target_tokens, prediction_tokens = rouge_tokenize(target), rouge_tokenize(prediction)
    return rouge_l_fmeasure_from_lcs(lcs_length(target_tokens, prediction_tokens),
                                     len(target_tokens), len(prediction_tokens))


class RougeLIndex:
    """Kept instructions, indexed so that a candidate's worst ROUGE-L match is found fast."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.texts: list[str] = []
        self._vocab: dict[str, int] = {}
        self._token_ids: list[list[int]] = []
        self._lengths = np.zeros(64, dtype=np.int64)
        # token id -> [kept ids array, counts array, used size]; arrays grow by doubling.
        self._postings: dict[int, list] = {}
        self.exact_comparisons = 0

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, tokens: list[str], grow: bool) -> list[int]:
        if grow:
            return [self._vocab.setdefault(token, len(self._vocab)) for token in tokens]
        # Tokens never seen in the kept set cannot match: -1 is in no posting list.
        return [self._vocab.get(token, -1) for token in tokens]

    def find_near_duplicate(self, text: str) -> tuple[int, float] | None:
        """(index, F) of a kept instruction whose ROUGE-L F-measure with `text` exceeds the threshold."""
        tokens = self._encode(rouge_tokenize(text), grow=False)
        n_kept = len(self.texts)
        if not tokens or not n_kept:
            return None
        overlap = np.zeros(n_kept, dtype=np.int64)
        for token, count in Counter(tokens).items():
            posting = self._postings.get(token)
            if posting is None:
                continue
            ids, counts, size = posting
            overlap[ids[:size]] += np.minimum(counts[:size], count)
        lengths = self._lengths[:n_kept]
        # F = 2 LCS / (m + n) <= 2 overlap / (m + n): only pairs whose bound reaches the threshold.
        possible = np.flatnonzero(2 * overlap > (self.threshold - _BOUND_MARGIN) * (lengths + len(tokens)))
        if possible.size == 0:
            return None
        masks: dict = {}
        for position, token in enumerate(tokens):
            masks[token] = masks.get(token, 0) | (1 << position)
        # Most promising first: the first hit ends the search.
        for kept in possible[np.argsort(-overlap[possible], kind="stable")]:
            self.exact_comparisons += 1
            kept_tokens = self._token_ids[kept]
            lcs = _lcs_with_masks(masks, len(tokens), kept_tokens)
            score = rouge_l_fmeasure_from_lcs(lcs, len(kept_tokens), len(tokens))
            if score > self.threshold:
                return int(kept), score
        return None

    def add(self, text: str) -> None:
        tokens = self._encode(rouge_tokenize(text), grow=True)
        index = len(self.texts)
        self.texts.append(text)
        self._token_ids.append(tokens)
        if index >= len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        self._lengths[index] = len(tokens)
        for token, count in Counter(tokens).items():
            posting = self._postings.get(token)
            if posting is None:
                posting = self._postings[token] = [np.empty(4, np.int64), np.empty(4, np.int64), 0]
            ids, counts, size = posting
            if size == len(ids):
                posting[0] = ids = np.concatenate([ids, np.empty_like(ids)])
                posting[1] = counts = np.concatenate([counts, np.empty_like(counts)])
            ids[size] = index
            counts[size] = count
            posting[2] = size + 1


def near_duplicate_of_any(text: str, others: list[str], threshold: float) -> tuple[int, float] | None:
    """(index, F) of the first of a few texts (the examples of one prompt) that `text` nearly copies."""
    tokens = rouge_tokenize(text)
    for index, other in enumerate(others):
        other_tokens = rouge_tokenize(other)
        score = rouge_l_fmeasure_from_lcs(lcs_length(other_tokens, tokens), len(other_tokens), len(tokens))
        if score > threshold:
            return index, score
    return None


def banned_word_pattern(banned_words: list[str]) -> re.Pattern | None:
    """Whole words or phrases, any case: `map` bans "Map the ..." but not "mapping"."""
    if not banned_words:
        return None
    alternatives = "|".join(re.escape(word) for word in sorted(banned_words, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def surface_rejection(text: str, min_chars: int, max_chars: int, banned: re.Pattern | None) -> str | None:
    """The reason the cheap filters reject `text` (checked in this order), or None."""
    if len(text) < min_chars:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    if banned is not None and banned.search(text):
        return "banned_word"
    first = text[0]
    if not first.isascii() or first in string.punctuation:
        return "leading_char"
    return None
