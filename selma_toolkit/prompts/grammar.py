"""The offline prompt source: compositional prompts from templates and word lists, no LLM.

A template such as ``"{count} {object1}s next to {count2} {object2}s"`` is filled from the
recipe's word lists: ``{object1}`` and ``{object2}`` both draw from ``object`` (a slot's list is
the one named like it, else the one named like it without trailing digits), and slots drawing
from the same list get different words when the list is long enough. ``{slot}s`` is a plural
(``box`` -> ``boxes``), and ``a`` before a vowel becomes ``an``. Batch i is a pure function of
(seed, i), so the source is deterministic from the skill's seed.
"""

from __future__ import annotations

import random
import re

from selma_toolkit.config.prompts import GrammarSettings

_SLOT = re.compile(r"\{(\w+)\}(s\b)?")
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def plural(word: str) -> str:
    """English plural of a regular noun (the cases word lists of objects need)."""
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


class GrammarSource:
    """Fills the recipe's templates; ``batch(index, size)`` gives the candidates of batch ``index``."""

    def __init__(self, grammar: GrammarSettings, seed: int):
        self.grammar = grammar
        self.seed = seed

    def _list_for(self, slot: str) -> str:
        return slot if slot in self.grammar.words else re.sub(r"\d+$", "", slot)

    def fill(self, template: str, rng: random.Random) -> str:
        """One prompt from ``template``; slots sharing a word list get distinct words if possible."""
        slots = list(dict.fromkeys(match.group(1) for match in _SLOT.finditer(template)))
        by_list: dict[str, list[str]] = {}
        for slot in slots:
            by_list.setdefault(self._list_for(slot), []).append(slot)
        values: dict[str, str] = {}
        for list_name, members in by_list.items():
            words = self.grammar.words[list_name]
            drawn = (
                rng.sample(words, len(members)) if len(words) >= len(members) else rng.choices(words, k=len(members))
            )
            values.update(zip(members, drawn, strict=True))
        text = _SLOT.sub(lambda m: plural(values[m.group(1)]) if m.group(2) else values[m.group(1)], template)
        return _ARTICLE.sub(lambda m: m.group(1) + "n ", text)

    def batch(self, index: int, size: int) -> list[str]:
        """``size`` prompts for batch ``index`` (the same for the same seed and index)."""
        rng = random.Random(f"selma-grammar:{self.seed}:{index}")
        return [self.fill(rng.choice(self.grammar.templates), rng) for _ in range(size)]
