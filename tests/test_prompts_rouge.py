"""ROUGE-L de-duplication: every decision and score equals rouge_score's, only computed faster."""

from __future__ import annotations

import math
import random

import numpy as np
from rouge_score import rouge_scorer

from selma_toolkit.prompts.rouge import RougeFilter, lcs_lengths

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = [
    "a",
    "the",
    "dog",
    "cat",
    "red",
    "blue",
    "on",
    "under",
    "big",
    "small",
    "sits",
    "runs",
    "park",
    "table",
    "chair",
    "of",
    "in",
    "with",
    "two",
    "three",
]


def reference_max(pool: list[str], text: str) -> float:
    """The plain loop the filter replaces: rouge_score against every pool prompt."""
    return max((SCORER.score(prompt, text)["rougeL"].fmeasure for prompt in pool), default=0.0)


def test_filter_decisions_and_max_scores_equal_rouge_score_on_a_stream_with_near_duplicates():
    rng = random.Random(0)
    pool: list[str] = []
    rouge = RougeFilter(0.8)
    specials = ["", "!!! ???", "Ünïcödé café — naïve", "A DOG, on the TABLE!!", "dog-cat/red_blue 42 42"]
    similar_seen = 0
    for step in range(220):
        if step < len(specials):
            text = specials[step]
        elif pool and rng.random() < 0.45:  # a near-duplicate: one word dropped, added or replaced
            words = rng.choice(pool).split() or ["dog"]
            edit = rng.randrange(3)
            if edit == 0 and len(words) > 1:
                words.pop(rng.randrange(len(words)))
            elif edit == 1:
                words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS))
            else:
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            text = " ".join(words)
        else:  # fresh; one in ten longer than 64 tokens (the multi-word bit-parallel path)
            length = rng.randint(65, 140) if rng.random() < 0.1 else rng.randint(1, 20)
            text = " ".join(rng.choice(WORDS) for _ in range(length))
        expected = reference_max(pool, text)
        check = rouge.check(text)
        assert check.similar == (expected > 0.8), (step, text)
        assert check.max_score == expected, (step, text)
        similar_seen += check.similar
        if not check.similar:
            pool.append(text)
            rouge.add(text)
    assert similar_seen > 20 and len(pool) > 100  # both outcomes were exercised many times


def test_bit_parallel_lcs_equals_the_dynamic_programme_for_short_and_long_sequences():
    rng = random.Random(1)
    for _ in range(60):
        candidate = [rng.randint(1, 5) for _ in range(rng.randint(1, 200))]
        rows = [[rng.randint(1, 5) for _ in range(rng.randint(0, 150))] for _ in range(4)]
        padded = np.zeros((len(rows), max(len(r) for r in rows) or 1), dtype=np.int32)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        got = lcs_lengths(np.asarray(candidate, dtype=np.int32), padded, vocab_size=6)
        expected = [rouge_scorer._lcs_table(candidate, row)[-1][-1] if row else 0 for row in rows]
        assert got.tolist() == expected


def _pair(m: int, n: int, lcs: int) -> tuple[str, str]:
    """Two texts of m and n tokens whose LCS is exactly ``lcs`` tokens."""
    shared = [f"s{i}" for i in range(lcs)]
    return " ".join(shared + [f"a{i}" for i in range(m - lcs)]), " ".join(shared + [f"b{i}" for i in range(n - lcs)])


def test_scores_exactly_at_the_threshold_are_not_above_it_as_in_rouge_score():
    # For every pair of lengths up to 12 and every LCS, set the threshold to rouge_score's own
    # float score of the pair: "above" must be False; one ulp lower it must be True.
    for m in range(1, 13):
        for n in range(1, 13):
            for lcs in range(1, min(m, n) + 1):
                first, second = _pair(m, n, lcs)
                score = SCORER.score(first, second)["rougeL"].fmeasure
                for threshold, similar in ((score, False), (math.nextafter(score, -1.0), True)):
                    rouge = RougeFilter(threshold)
                    rouge.add(first)
                    check = rouge.check(second)
                    assert (check.similar, check.max_score) == (similar, score), (m, n, lcs, threshold)
