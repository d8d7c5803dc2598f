"""Exact, fast ROUGE-L de-duplication against a growing pool of prompts.

A candidate is "similar" when its ROUGE-L F-measure against some prompt in the pool is above the
threshold, with every decision and score identical to
``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)`` (the rule of Self-Instruct,
Alpaca and the SELMA authors' code). The straightforward loop scores every pair with a pure-Python
dynamic programme; this module gets the same numbers with exact methods only:

* the same tokeniser (rouge_score's own), with tokens mapped to integer ids once per prompt;
* F = 2PR / (P + R) with P = L/n, R = L/m depends only on (L, m, n), so for every pair of lengths
  the smallest LCS length L that passes is tabulated once, with the same float operations as
  rouge_score; a pair whose LCS upper bound (the multiset overlap of the two token bags, from an
  inverted index) is below that L cannot pass and is skipped;
* the LCS of the remaining pairs comes from a bit-parallel algorithm (Hyyro 2004; Crochemore et
  al. 2001) vectorised over pool prompts with numpy: one 64-bit word per 64 candidate tokens.

The exact maximum score (kept in the prompt file as ``max_rouge``) is found by branch and bound on
the same overlap bound: only prompts whose bound could beat the best score so far are scored.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from rouge_score.tokenize import tokenize as _rouge_tokenize

_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_NOT_REACHABLE = np.iinfo(np.int32).max
# Bound scores are real-number values; rouge_score's float F may exceed the real value by a few
# ulps, so candidates within this margin of the best score are still scored exactly.
_BOUND_SLACK = 1e-9
_CHUNK = 256


def rouge_tokens(text: str) -> list[str]:
    """The tokens rouge_score's default tokeniser gives without stemming: lower-cased runs of ASCII
    letters and digits (everything else separates tokens and is dropped)."""
    return _rouge_tokenize(text, None)


def rouge_l_fmeasure(lcs: np.ndarray, m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """ROUGE-L F from LCS lengths and the two token counts, with rouge_score's float operations:
    ``P = L/n, R = L/m, F = 2 * P * R / (P + R)``, and 0 when either text has no token or L = 0."""
    lcs, m, n = (np.asarray(a, dtype=np.int64) for a in (lcs, m, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / n
        recall = lcs / m
        score = 2 * precision * recall / (precision + recall)
    return np.where((lcs > 0) & (m > 0) & (n > 0), score, 0.0)


def lcs_lengths(candidate: np.ndarray, rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """LCS length of ``candidate`` (token ids, shape [m]) with each row of ``rows`` (shape [k, L],
    token ids padded with 0, the id that matches nothing); ids are < ``vocab_size``.

    Bit-parallel LCS: bit i of the state V stands for candidate position i; for each token b of a
    row, with U = V & Match[b]: V <- (V + U) | (V - U). The LCS length is the number of zero bits.
    Candidates longer than 64 tokens use several words with the carry of the addition propagated.
    """
    m = len(candidate)
    k = rows.shape[0]
    if m == 0 or k == 0:
        return np.zeros(k, dtype=np.int64)
    words = (m + 63) // 64
    match = np.zeros((vocab_size, words), dtype=np.uint64)
    positions = np.arange(m)
    np.bitwise_or.at(
        match, (candidate, positions // 64), np.left_shift(np.uint64(1), (positions % 64).astype(np.uint64))
    )
    match[0] = 0
    if words == 1:
        table = match[:, 0]
        state = np.full(k, _ONES, dtype=np.uint64)
        for column in rows.T:
            hit = state & table[column]
            state = (state + hit) | (state - hit)
        # Bits above m stay 1 (their Match bits are 0), so every 0 bit is an LCS position.
        return 64 - np.bitwise_count(state).astype(np.int64)
    state = np.full((words, k), _ONES, dtype=np.uint64)
    for column in rows.T:
        table_rows = match[column].T  # [words, k]
        carry = np.zeros(k, dtype=np.uint64)
        for w in range(words):
            current = state[w]
            hit = current & table_rows[w]
            total = current + hit + carry
            # Overflow of current + hit + carry (mod 2^64), i.e. the carry into the next word.
            carry = np.where(carry.astype(bool), total <= current, total < current).astype(np.uint64)
            state[w] = total | (current - hit)
    return (64 * words - np.bitwise_count(state).astype(np.int64).sum(axis=0)).astype(np.int64)


class _GrowingArray:
    """An append-only numpy array with amortised doubling (postings of the inverted index)."""

    def __init__(self, dtype: type):
        self._data = np.empty(8, dtype=dtype)
        self._size = 0

    def append(self, value: int) -> None:
        if self._size == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self._size] = value
        self._size += 1

    def view(self) -> np.ndarray:
        return self._data[: self._size]


@dataclass(frozen=True)
class RougeCheck:
    """The verdict on one candidate: ``similar`` when some pool prompt scores above the threshold;
    ``max_score`` is the exact highest ROUGE-L F against the pool (0.0 for an empty pool)."""

    similar: bool
    max_score: float


class RougeFilter:
    """A pool of prompts and the exact ROUGE-L test of new candidates against all of them.

    ``check(text)`` decides; ``add(text)`` puts a prompt into the pool. Decisions and scores equal
    rouge_score's ``RougeScorer(["rougeL"], use_stemmer=False)`` F-measure compared with ``>``.
    """

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self._vocab: dict[str, int] = {}
        self._tokens = np.zeros((64, 32), dtype=np.int32)
        self._lengths = np.zeros(64, dtype=np.int64)
        self._size = 0
        self._postings: dict[int, tuple[_GrowingArray, _GrowingArray]] = {}
        self._first_passing = np.zeros((0, 0), dtype=np.int64)

    def __len__(self) -> int:
        return self._size

    def _encode(self, text: str) -> np.ndarray:
        # Id 0 is the padding id; real tokens count from 1.
        ids = [self._vocab.setdefault(token, len(self._vocab) + 1) for token in rouge_tokens(text)]
        return np.asarray(ids, dtype=np.int32)

    def _passing_table(self, longest: int) -> np.ndarray:
        """[m, n] -> the smallest LCS length whose F is above the threshold (or a huge number).

        Built with the same float operations rouge_score uses, so "bound below this value" is an
        exact reason to skip a pair, not an approximation."""
        if self._first_passing.shape[0] > longest:
            return self._first_passing
        size = max(16, 1 << int(longest).bit_length())
        m = np.arange(size)[:, None]
        n = np.arange(size)[None, :]
        first = np.full((size, size), _NOT_REACHABLE, dtype=np.int64)
        for lcs in range(size - 1, 0, -1):  # descending: the last write is the smallest L
            passes = (lcs <= np.minimum(m, n)) & (rouge_l_fmeasure(np.int64(lcs), m, n) > self.threshold)
            first[passes] = lcs
        self._first_passing = first
        return first

    def add(self, text: str) -> None:
        """Put ``text`` into the pool."""
        ids = self._encode(text)
        if self._size == len(self._lengths):
            self._tokens = np.concatenate([self._tokens, np.zeros_like(self._tokens)])
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        if len(ids) > self._tokens.shape[1]:
            wider = np.zeros((self._tokens.shape[0], len(ids)), dtype=np.int32)
            wider[:, : self._tokens.shape[1]] = self._tokens
            self._tokens = wider
        row = self._size
        self._tokens[row, : len(ids)] = ids
        self._lengths[row] = len(ids)
        for token, count in Counter(ids.tolist()).items():
            rows, counts = self._postings.setdefault(token, (_GrowingArray(np.int64), _GrowingArray(np.int64)))
            rows.append(row)
            counts.append(count)
        self._size += 1

    def _overlap(self, ids: np.ndarray) -> np.ndarray:
        """Multiset overlap of ``ids`` with every pool prompt: an upper bound on their LCS length."""
        overlap = np.zeros(self._size, dtype=np.int64)
        for token, count in Counter(ids.tolist()).items():
            posting = self._postings.get(token)
            if posting is not None:
                rows, counts = posting
                overlap[rows.view()] += np.minimum(counts.view(), count)
        return overlap

    def _scores(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact ROUGE-L F of the candidate against the pool prompts ``rows``."""
        if rows.size == 0:
            return np.zeros(0)
        lengths = self._lengths[rows]
        tokens = self._tokens[rows, : int(lengths.max())]
        lcs = lcs_lengths(ids, tokens, len(self._vocab) + 1)
        return rouge_l_fmeasure(lcs, lengths, len(ids))

    def check(self, text: str) -> RougeCheck:
        """Whether ``text`` is too similar to a pool prompt, and its exact highest score."""
        ids = self._encode(text)
        n = len(ids)
        if self._size == 0 or n == 0:
            return RougeCheck(similar=False, max_score=0.0)
        lengths = self._lengths[: self._size]
        overlap = self._overlap(ids)
        first = self._passing_table(max(n, int(lengths.max())))
        could_pass = overlap >= first[lengths, n]
        decided = np.flatnonzero(could_pass)
        scores = self._scores(ids, decided)
        best = float(scores.max()) if scores.size else 0.0
        if best > self.threshold:
            # Every prompt that could score above the threshold was scored: this is the maximum.
            return RougeCheck(similar=True, max_score=best)
        # Accepted: find the exact maximum among the rest by branch and bound on the overlap.
        bound = 2.0 * overlap / (lengths + n)
        open_rows = np.flatnonzero(~could_pass & (overlap > 0) & (bound + _BOUND_SLACK >= best))
        while open_rows.size:
            if open_rows.size > _CHUNK:  # score the most promising first: best rises, the rest drop out
                order = np.argpartition(-bound[open_rows], _CHUNK)
                chunk, open_rows = open_rows[order[:_CHUNK]], open_rows[order[_CHUNK:]]
            else:
                chunk, open_rows = open_rows, open_rows[:0]
            best = max(best, float(self._scores(ids, chunk).max()))
            open_rows = open_rows[bound[open_rows] + _BOUND_SLACK >= best]
        return RougeCheck(similar=False, max_score=best)
