"""Stage 1's settings: the LLM endpoint and the offline grammar of a skill recipe, and the names of
the prompt sources (the registry's, ``registries.PROMPT_SOURCES``)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from selma_toolkit.config.base import Fraction, PositiveInt, StrictModel
from selma_toolkit.config.registries import PROMPT_SOURCES

PromptSourceName = Literal[tuple(PROMPT_SOURCES)]  # type: ignore[valid-type]  # the registry's names


class LLMSettings(StrictModel):
    """An OpenAI-compatible endpoint and the sampling settings of the authors' code."""

    api: Literal["chat", "completions"] = "completions"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo-instruct"
    # Name of the environment variable that holds the key; the key itself never enters a recipe.
    api_key_env: str = "OPENAI_API_KEY"
    # None: required unless base_url is on this machine (a local vLLM / llama.cpp / Ollama server).
    api_key_required: bool | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Fraction = 1.0
    max_tokens: PositiveInt = 3072
    concurrency: PositiveInt = 5
    max_retries: Annotated[int, Field(ge=0)] = 5
    timeout: Annotated[float, Field(gt=0)] = 60.0
    # Budgets per invocation (cached answers are free and not counted); the token budget is checked
    # before each request, so the answers in flight may pass it.
    max_requests: PositiveInt | None = None
    max_total_tokens: PositiveInt | None = None
    # Stop when this many requests in a row add no prompt (an endpoint answering garbage).
    max_empty_rounds: PositiveInt = 10
    cache: bool = True


class GrammarSettings(StrictModel):
    """The offline prompt source: templates whose ``{slot}`` fields are filled from word lists."""

    templates: Annotated[list[str], Field(min_length=1)]
    words: dict[str, Annotated[list[str], Field(min_length=1)]]

    @model_validator(mode="after")
    def _slots_have_words(self) -> GrammarSettings:
        for template in self.templates:
            for slot in re.findall(r"\{(\w+)\}", template):
                base = re.sub(r"\d+$", "", slot)  # {object1}, {object2} both draw from "object"
                if slot not in self.words and base not in self.words:
                    raise ValueError(f"template {template!r} uses slot {{{slot}}} but words has no list {base!r}")
        return self
