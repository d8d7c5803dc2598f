"""Prompt sources: where a skill's candidate prompts come from, behind one protocol.

``generate_prompts`` (generate.py) drives any source the same way: for request i it asks
``prepare(i, examples)`` for a request, takes the answer at once when ``ready`` has it (a cached
LLM answer, a grammar batch) or sends ``fetch`` to a thread pool (at most ``window`` in flight),
and stops with ``exhausted(...)`` when too many answers in a row added nothing.

Adding a source: a class with this protocol and one entry in the registry
(``config/registries.py``'s ``PROMPT_SOURCES``); the recipe's ``source`` field accepts every name
listed there (``config/prompts.py``'s ``PromptSourceName``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from selma_toolkit.config.recipes import SkillRecipe
from selma_toolkit.config.registries import PROMPT_SOURCES, import_object
from selma_toolkit.errors import EndpointError, RecipeError
from selma_toolkit.prompts.client import LLMClient
from selma_toolkit.prompts.grammar import GrammarSource as GrammarBatches
from selma_toolkit.prompts.parse import parse_answer, request_text


@dataclass(frozen=True)
class Batch:
    """The candidates of one answer and where they came from."""

    candidates: list[str]
    cut_off: int = 0
    request_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    from_network: bool = False
    from_cache: bool = False  # an LLM answer read from the answer cache (counted as a cache hit)


class PromptSource(Protocol):
    """What generate_prompts needs from a source."""

    window: int  # requests in flight at most (1 for a source that answers at once)

    def prepare(self, index: int, examples: list[str]) -> Any:
        """The request for request number ``index``, shown ``examples`` from the pool."""

    def ready(self, request: Any) -> Batch | None:
        """The answer now if there is one without waiting (a cache, a grammar), else None."""

    def fetch(self, request: Any) -> Batch:
        """The answer, waiting for it (run in a worker thread)."""

    def exhausted(self, rounds: int, candidates: int, rejected: str, kept_note: str) -> Exception:
        """The error for ``rounds`` answers in a row that added no prompt, saying what to change."""

    def close(self) -> None:
        """Release connections and files."""


class LLMSource:
    """Requests to the recipe's OpenAI-compatible endpoint; answers from the cache when it has them."""

    def __init__(self, skill: SkillRecipe, cache_dir: Path | None):
        self.skill = skill
        self.window = skill.llm.concurrency
        self.client = LLMClient(skill.llm, cache_dir)  # checks the API key now, before any request

    def prepare(self, index: int, examples: list[str]) -> tuple[str, str]:
        text = request_text(self.skill.instruction, examples, self.skill.prompts_per_request, self.skill.max_words)
        return text, f"{self.skill.seed}:{index}"

    def ready(self, request: tuple[str, str]) -> Batch | None:
        answer = self.client.cached(*request)
        return None if answer is None else self._batch(answer)

    def fetch(self, request: tuple[str, str]) -> Batch:
        return self._batch(self.client.complete(*request))

    @staticmethod
    def _batch(answer: Any) -> Batch:
        parsed = parse_answer(answer.text, truncated=answer.finish_reason == "length")
        return Batch(
            parsed.candidates,
            parsed.cut_off,
            answer.request_id,
            answer.prompt_tokens,
            answer.completion_tokens,
            from_network=not answer.from_cache,
            from_cache=answer.from_cache,
        )

    def exhausted(self, rounds: int, candidates: int, rejected: str, kept_note: str) -> Exception:
        llm = self.skill.llm
        return EndpointError(
            f"skill {self.skill.name!r}: {rounds} answers in a row from {llm.base_url} (model {llm.model!r}) added no "
            f"usable prompt (llm.max_empty_rounds = {llm.max_empty_rounds}; this run: {candidates} "
            f"candidates, rejected: {rejected}). Expected a numbered list of prompts; check llm.model, "
            f"llm.api and the instruction. {kept_note}"
        )

    def close(self) -> None:
        self.client.close()


class GrammarSource:
    """The offline grammar: every batch is ready at once, nothing goes over the network."""

    window = 1

    def __init__(self, skill: SkillRecipe, cache_dir: Path | None = None):
        assert skill.grammar is not None  # the recipe validator guarantees it for source = "grammar"
        self.skill = skill
        self.grammar = GrammarBatches(skill.grammar, skill.seed)

    def prepare(self, index: int, examples: list[str]) -> int:
        return index

    def ready(self, index: int) -> Batch:
        return Batch(self.grammar.batch(index, self.skill.prompts_per_request), request_id=f"grammar-{index}")

    def fetch(self, index: int) -> Batch:
        return self.ready(index)

    def exhausted(self, rounds: int, candidates: int, rejected: str, kept_note: str) -> Exception:
        return RecipeError(
            f"skill {self.skill.name!r}: {rounds} grammar batches in a row added no prompt (rejected: "
            f"{rejected}); the grammar cannot make more prompts that differ enough: add templates "
            f"or words, lower num_prompts or raise similarity_threshold. {kept_note}"
        )

    def close(self) -> None:
        pass


@contextlib.contextmanager
def open_source(skill: SkillRecipe, cache_dir: Path | None) -> Iterator[PromptSource]:
    """The skill's prompt source (the registry's class for ``skill.source``), opened for one run and closed after it."""
    source: PromptSource = import_object(PROMPT_SOURCES[skill.source])(skill, cache_dir)
    try:
        yield source
    finally:
        source.close()
