"""`selma skill new`: write a new skill recipe, every field commented, and validate it.

The recipe starts from an existing skill (``from_skill``: a shipped name such as ``coco`` or a
file) or from the paper's defaults. Text only its author can write (the description, the seed
prompts, what the LLM is asked for) is marked ``<fill in: ...>``; recipe.SkillRecipe refuses a
recipe that still holds such a mark, so an unfinished recipe never reaches an LLM or a run.
The file is written by hand rather than by a TOML writer, because TOML writers drop comments.
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from selma_toolkit.config.base import NAME_PATTERN, PLACEHOLDER
from selma_toolkit.config.prompts import LLMSettings
from selma_toolkit.config.recipes import SkillRecipe
from selma_toolkit.errors import Option, RecipeError, Remedy
from selma_toolkit.io import atomic_write_text
from selma_toolkit.recipe import apply_overrides, load_skill_recipe, skill_recipe_from_dict

# An instruction in the form of the authors' (method.md), for the author to finish.
GENERIC_INSTRUCTION = f"""Please create {{n}} more diverse image descriptions. Here are several rules for creating the image descriptions:
1. {PLACEHOLDER}: what the descriptions should test, e.g. "The descriptions should be able to evaluate a model's capability to count objects.">
2. The descriptions need to mention diverse objects that frequently appear in daily life.
3. Each description should be less than {{max_words}} words.
4. The text style of the descriptions should be different from each other.

Here are some image description examples:"""
# A small grammar that runs as it is, for the author to replace with the skill's own.
STARTER_GRAMMAR = {
    "templates": ["a photo of {count} {object}s", "{count} {color} {object}s on a {surface}"],
    "words": {
        "count": ["two", "three"],
        "color": ["red", "green", "blue", "yellow"],
        "object": ["apple", "cup", "book", "ball"],
        "surface": ["table", "bench", "shelf"],
    },
}
_LLM_COMMENTS = {
    "api": '"completions" (the paper\'s gpt-3.5-turbo-instruct is a completions model) or "chat"',
    "base_url": "any OpenAI-compatible endpoint: OpenAI, or a local vLLM / llama.cpp / Ollama server "
    '(e.g. "http://127.0.0.1:8000/v1")',
    "model": "the model name the endpoint knows",
    "api_key_env": "the environment variable holding the API key (the key itself never goes into a recipe)",
    "api_key_required": "unset: a key is required unless base_url is on this machine",
    "temperature": "sampling settings of the authors' code: temperature 1.0, top_p 1.0, at most 3072 tokens",
    "concurrency": "requests in flight at once (the authors: 5)",
    "max_retries": "retries of a failed request, and its timeout in seconds",
    "max_requests": "spending limits per invocation (cached answers cost nothing again), e.g. 200 requests",
    "max_empty_rounds": "stop after this many requests in a row that add no prompt (an endpoint answering garbage)",
    "cache": "keep every answer, so a rerun or a resumed run asks nothing twice",
}


@dataclass(frozen=True)
class NewSkill:
    """A written skill recipe and the fields its author still has to fill in."""

    path: Path
    name: str
    source: str
    unfilled: list[str]


def new_skill_recipe(
    name: str,
    out: str | Path,
    *,
    source: str | None = None,
    from_skill: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> NewSkill:
    """Write the skill recipe ``name`` to ``out`` (a commented TOML file) and validate it.

    ``from_skill`` (a shipped skill name or a file) supplies every value but the name; ``source``
    (``llm`` or ``grammar``) defaults to its source, else ``llm``; ``overrides`` are ``--set``
    style ``key=value`` strings applied last. Returns the fields still marked ``<fill in``.
    """
    if not re.match(NAME_PATTERN, name) or len(name) > 64:
        raise RecipeError(
            f"skill name {name!r}: expected lower-case letters, digits, '-' and '_', starting with a "
            "letter or digit (at most 64 characters), e.g. 'shape-count'"
        )
    out = Path(out)
    if out.exists() and not force:
        raise RecipeError(
            what="already exists",
            where=str(out),
            remedies=[Remedy.change("out", "file"), Remedy.set("force", True, note="to replace it")],
        )
    if source not in (None, "llm", "grammar"):
        raise RecipeError(what="", where=Option("source"), found=source, expected="llm or grammar")
    data = _start_from(name, from_skill)
    data["source"] = source or data.get("source", "llm")
    if data["source"] == "grammar" and not data.get("grammar"):
        data["grammar"] = copy.deepcopy(STARTER_GRAMMAR)  # --set may change it in place
    if data["source"] == "llm" and not data.get("instruction", "").strip():
        data["instruction"] = GENERIC_INSTRUCTION
    data = apply_overrides(data, overrides or [])
    wanted = skill_recipe_from_dict(_filled(data), f"new skill {name!r}", overrides)
    text = recipe_text(data, from_skill)
    unfilled = check_new_skill(text, str(out))
    if skill_recipe_from_dict(_filled(tomllib.loads(text)), str(out)) != wanted:  # the writer dropped a value
        raise RuntimeError(f"skill_new: the written recipe differs from the values given:\n{text}")

    atomic_write_text(out, text)
    return NewSkill(out, name, data["source"], unfilled)


def _start_from(name: str, from_skill: str | None) -> dict[str, Any]:
    if from_skill is None:
        return {
            "name": name,
            "description": f"{PLACEHOLDER}: what this skill teaches, in one line>",
            "seeds": [
                f"{PLACEHOLDER}: example prompt {i} of the skill, as its users would write it>" for i in (1, 2, 3)
            ],
        }
    data = load_skill_recipe(from_skill).model_dump(mode="json", exclude_none=True)
    return {**data, "name": name}


def check_new_skill(text: str, source: str) -> list[str]:
    """Validate a new recipe's TOML as if its ``<fill in`` marks were filled (any other problem is
    a RecipeError); return the fields that still hold one."""
    data = tomllib.loads(text)
    unfilled = []
    for key, value in data.items():
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, str) and PLACEHOLDER in item:
                unfilled.append(f"{key}[{index}]" if isinstance(value, list) else key)
    skill_recipe_from_dict(_filled(data), source)
    return unfilled


def _filled(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, "filled in") if PLACEHOLDER in value else value
    if isinstance(value, list):
        return [_filled(v) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------- writing


def _value(value: Any) -> str:
    """A TOML value; lists of strings inline when short, else one item per line."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        items = [_value(v) for v in value]
        inline = "[" + ", ".join(items) + "]"
        return inline if len(inline) <= 90 else "[\n" + "".join(f"    {item},\n" for item in items) + "]"
    return tomli_w.dumps({"v": value}, multiline_strings=True)[len("v = ") :].rstrip("\n")


def _field(key: str, value: Any, comment: str | None = None) -> str:
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    return "\n".join([*lines, f"{key} = {_value(value)}"]) + "\n"


def recipe_text(data: dict[str, Any], from_skill: str | None = None, *, command: str = "selma skill new") -> str:
    """The commented TOML of a skill recipe (``data``: SkillRecipe fields); ``command`` names its writer."""

    def get(key: str) -> Any:
        return data.get(key, SkillRecipe.model_fields[key].default)

    origin = f", starting from {from_skill!r}" if from_skill else ""
    # A recipe with nothing left to write (e.g. proposed by `selma skill propose`) is not told to fill anything in.
    fill = "Replace every <fill in: ...> text, then" if PLACEHOLDER in repr(data) else "Review every value, then"
    head = (
        f"# Skill recipe {data['name']!r}, written by `{command}`{origin}. Every field is explained\n"
        f"# above it; the numbers are the SELMA paper's unless noted. {fill}\n"
        '# check the file with `selma recipe validate FILE` and list it in a run recipe: skills = ["FILE"].\n\n'
    )
    parts = [
        head,
        _field(
            "name",
            data["name"],
            "The skill's name: it names the expert (experts/<name>.safetensors) and its folder in a run.",
        ),
        _field(
            "description",
            get("description"),
            "One line for people: what the skill teaches the model (shown in model cards).",
        ),
        _field(
            "source",
            data["source"],
            'Where the prompts come from: "llm" (any OpenAI-compatible endpoint, [llm] below) or\n'
            '"grammar" (offline, from the templates and word lists in [grammar]; no API key).',
        ),
    ]
    if data.get("instruction") or data["source"] == "llm":
        parts.append(
            _field(
                "instruction",
                data.get("instruction", ""),
                'What the LLM is asked (source = "llm"): {n} becomes prompts_per_request and {max_words}\n'
                "max_words; the request then shows examples_per_request prompts drawn from the seeds and the\n"
                "prompts kept so far as a numbered list, which the LLM continues (the authors' request form).",
            )
        )
    parts += [
        _field(
            "seeds",
            list(data["seeds"]),
            "Three or more example prompts in the style the skill needs, as its users would write\n"
            "them. The LLM sees them as examples; every new prompt is de-duplicated against them.",
        ),
        _field("num_prompts", get("num_prompts"), "Prompts kept, one training image each (the paper: 1000 per skill)."),
        _field(
            "similarity_threshold",
            get("similarity_threshold"),
            "A new prompt is dropped when its ROUGE-L F against a kept prompt is above this (the paper: 0.8).",
        ),
        _field(
            "max_words", get("max_words"), "Longest prompt kept, in words (the authors: 30; 50 for paragraph captions)."
        ),
        _field("examples_per_request", get("examples_per_request"), "Examples shown per request (the paper: 3)."),
        _field(
            "prompts_per_request", get("prompts_per_request"), "New prompts asked for per request (the authors: 20)."
        ),
        _field("seed", get("seed"), "Seed of the example draws and of the grammar: the same seed, the same requests."),
    ]
    license_comment = "The license of the prompts, written into model cards."
    parts.append(
        _field("license", data["license"], license_comment)
        if data.get("license")
        else f'# {license_comment}\n# license = "cc-by-4.0"\n'
    )
    if data["source"] == "llm" or data.get("llm", {}) != LLMSettings().model_dump(mode="json", exclude_none=True):
        parts.append("\n" + _llm_table(data.get("llm", {})))
    if data.get("grammar"):
        parts.append("\n" + _grammar_table(data["grammar"], starter=data["grammar"] == STARTER_GRAMMAR))
    return "".join(parts)


def _llm_table(values: dict[str, Any]) -> str:
    lines = ['# The LLM endpoint and its sampling settings (used when source = "llm").\n[llm]\n']
    for key, field in LLMSettings.model_fields.items():
        value = values.get(key, field.default)
        comment = _LLM_COMMENTS.get(key)
        if value is None:
            example = {"max_requests": 200, "max_total_tokens": 500000, "api_key_required": True}[key]
            lines.append((f"# {comment}\n" if comment else "") + f"# {key} = {_value(example)}\n")
        else:
            lines.append(_field(key, value, comment))
    return "".join(lines)


def _grammar_table(grammar: dict[str, Any], *, starter: bool) -> str:
    note = (
        "A starter grammar that runs as it is: replace the templates and word lists with your skill's.\n"
        if starter
        else ""
    )
    lines = [
        f"# {line}\n"
        for line in (
            note
            + 'Offline prompts (source = "grammar"): each prompt fills one template; {slot} takes a word from the\n'
            'list of that name, {object1} and {object2} both from "object" (different words), "{object}s" is a plural.'
        ).splitlines()
    ]
    lines += ["[grammar]\n", _field("templates", list(grammar["templates"])), "\n[grammar.words]\n"]
    lines += [_field(key, list(words)) for key, words in grammar["words"].items()]
    return "".join(lines)
