"""The filters every candidate prompt passes, each rejection with a counted reason.

In order: ``empty`` (nothing left after removing list decoration), ``too_long`` (more than
``max_words`` whitespace-separated words), ``duplicate`` (the same text as a pool prompt, ignoring
case and spacing), ``similar`` (ROUGE-L F above the threshold against a pool prompt). The pool
starts with the seed prompts and grows with every accepted prompt, so candidates of the same
answer are also checked against each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from selma_toolkit.prompts.rouge import RougeFilter

REASONS = ("empty", "too_long", "duplicate", "similar", "cut_off")


def normalized(text: str) -> str:
    """The form exact duplicates are compared in: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class Verdict:
    """``reason`` is None for an accepted candidate; ``max_rouge`` is its exact highest ROUGE-L F
    against the pool (set when the ROUGE-L test ran)."""

    reason: str | None
    max_rouge: float | None = None


class PromptPool:
    """Seed and accepted prompts in acceptance order, and the filters new candidates must pass."""

    def __init__(self, max_words: int, threshold: float):
        self.max_words = max_words
        self.prompts: list[str] = []
        self._seen: set[str] = set()
        self._rouge = RougeFilter(threshold)

    def __len__(self) -> int:
        return len(self.prompts)

    def judge(self, text: str) -> Verdict:
        """Whether ``text`` may join the pool, and why not."""
        if not text.strip():
            return Verdict("empty")
        if len(text.split()) > self.max_words:
            return Verdict("too_long")
        if normalized(text) in self._seen:
            return Verdict("duplicate")
        check = self._rouge.check(text)
        return Verdict("similar" if check.similar else None, check.max_score)

    def add(self, text: str) -> None:
        """Put ``text`` into the pool (without judging it: seeds and prompts read back on resume)."""
        self.prompts.append(text)
        self._seen.add(normalized(text))
        self._rouge.add(text)
