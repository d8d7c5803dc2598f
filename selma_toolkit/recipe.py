"""Recipes: TOML files -> validated objects.

Two kinds of recipe:

* a **skill recipe** (``recipes/skills/*.toml``) says how to make one skill's prompts: description,
  instruction for the LLM, seed prompts, counts, de-duplication threshold, LLM settings, or a
  grammar for the offline source;
* a **run recipe** (``recipes/runs/*.toml``) says what to do with them: base model, which skills,
  and the settings of every stage (images, training, merging, evaluation).

Every default is the paper's number (method.md). Unknown keys are errors, with the closest valid
key suggested. ``--set a.b=value`` overrides are parsed as TOML values, then validated like the
file. ``resolved_toml`` / ``recipe_hash`` give the fully resolved recipe that each run writes
next to its outputs. Each stage's section is defined next to the stage's code (settings.py names
the modules); this module puts them together.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import tomli_w
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from selma_toolkit.errors import RecipeError
from selma_toolkit.evaluate.settings import EvaluateSettings, ScorerName  # noqa: F401 - part of this module's API
from selma_toolkit.images.settings import ImageSettings
from selma_toolkit.lora.merging.settings import MergeSettings
from selma_toolkit.prompts.settings import (
    GrammarSettings,
    LLMSettings,
    PromptSourceName,
)
from selma_toolkit.resources import shipped_run, shipped_skill
from selma_toolkit.settings import (  # noqa: F401
    NAME_PATTERN,
    PLACEHOLDER,
    Fraction,
    Name,
    PositiveInt,
    StrictModel,
)
from selma_toolkit.train.settings import (  # noqa: F401
    UNET_TARGET_MODULES,
    DPOSettings,
    MoESettings,
    TrainSettings,
)

# --------------------------------------------------------------------------------------------
# Skill recipes (stage 1)
# --------------------------------------------------------------------------------------------


class SkillRecipe(StrictModel):
    """One skill: how the LLM (or the grammar) is asked for prompts, and how many are kept.

    Request convention (the authors' code): ``instruction`` with ``{n}`` (= prompts_per_request)
    and ``{max_words}`` filled in, followed by ``examples_per_request`` prompts sampled from the
    pool as a numbered list ``1. ...``; the answer is parsed as a numbered list continuing after
    them (numbered or bulleted lines; prose around them is ignored). A candidate is kept when it
    is non-empty, has at most ``max_words`` words, is no exact duplicate and its ROUGE-L F against
    every pool prompt is at most ``similarity_threshold``. See selma_toolkit/prompts/.
    """

    name: Name
    description: str = ""
    source: PromptSourceName = "llm"
    instruction: str = ""
    seeds: Annotated[list[str], Field(min_length=3)]
    num_prompts: PositiveInt = 1000
    similarity_threshold: Fraction = 0.8
    max_words: PositiveInt = 30
    examples_per_request: PositiveInt = 3
    prompts_per_request: PositiveInt = 20
    seed: int = 0
    license: str | None = None
    llm: LLMSettings = LLMSettings()
    grammar: GrammarSettings | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds_not_blank(cls, seeds: list[str]) -> list[str]:
        if any(not s.strip() for s in seeds):
            raise ValueError("seed prompts must not be empty")
        return seeds

    @model_validator(mode="after")
    def _source_has_what_it_needs(self) -> "SkillRecipe":
        if self.source == "llm" and not self.instruction.strip():
            raise ValueError("instruction: must not be empty for source = 'llm' (it is what the LLM is asked)")
        if self.source == "grammar" and self.grammar is None:
            raise ValueError("grammar: source = 'grammar' needs a [grammar] table with templates and words")
        return self

    @model_validator(mode="after")
    def _placeholders_filled_in(self) -> "SkillRecipe":
        # `selma skill new` (skill_new.py) marks text the user must write with PLACEHOLDER.
        texts = {"description": self.description, "instruction": self.instruction,
                 **{f"seeds[{i}]": seed for i, seed in enumerate(self.seeds)}}
        unfilled = [field for field, text in texts.items() if PLACEHOLDER in text]
        if unfilled:
            raise ValueError(f"{', '.join(unfilled)}: still hold{'s' if len(unfilled) == 1 else ''} the {PLACEHOLDER}...> "
                             "text that `selma skill new` wrote; replace it with the skill's own text")
        return self


# --------------------------------------------------------------------------------------------
# Run recipes (stages 2-4 and evaluation)
# --------------------------------------------------------------------------------------------


class RunRecipe(StrictModel):
    """A whole SELMA run: base model, skills, and every stage's settings."""

    name: Name
    # A Hub id, a local diffusers folder, or "tiny:sd1" / "tiny:sd2" / "tiny:sdxl" / "tiny:sd3" / "tiny:flux" (embedded).
    base_model: str
    revision: str | None = None
    skills: list[SkillRecipe] = []
    # Existing experts to merge in: catalog names, Hub repo ids or local files.
    experts: list[str] = []
    # Also train one LoRA on the mixture of all skill datasets (the paper's baseline).
    joint: bool = False
    output_dir: str | None = None
    license: str = "creativeml-openrail-m"
    images: ImageSettings = ImageSettings()
    train: TrainSettings = TrainSettings()
    merge: MergeSettings = MergeSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    moe: MoESettings = MoESettings()
    dpo: DPOSettings = DPOSettings()

    @model_validator(mode="after")
    def _skills_unique(self) -> "RunRecipe":
        names = [s.name for s in self.skills]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"skills: each skill may appear once, found {duplicates} more than once")
        if not self.skills and not self.experts:
            raise ValueError("skills: a run needs at least one skill (or one expert in experts)")
        if self.dpo.scorer == "judge" and self.images.judge is None:
            raise ValueError("dpo.scorer = \"judge\" picks DPO's pairs with images.judge, which is not set; set "
                             "images.judge (and images.judge_model) or choose a scorer for dpo.scorer")
        return self

    def skill(self, name: str) -> SkillRecipe:
        """The skill called ``name``, or a RecipeError listing the run's skills."""
        for skill in self.skills:
            if skill.name == name:
                return skill
        raise RecipeError(f"run {self.name!r} has no skill {name!r}; its skills are {[s.name for s in self.skills]}")

    @property
    def image_model(self) -> str:
        """The model that draws the training images (the base model unless weak-to-strong)."""
        return self.images.model or self.base_model


# --------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error names the file, line and column (``FILE: line L, column C:
    TOML syntax error: <what>``); an empty file or one that is not UTF-8 text is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); expected a TOML recipe file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: {_toml_error_position(str(exc), text)}") from None
    if not data:
        what = "the file is empty" if not text.strip() else "the file holds only comments and blank lines"
        raise RecipeError(f"{path}: {what}; expected a TOML recipe (see `selma recipe show tiny-demo` for a run "
                          "recipe, `selma skill new NAME` for a skill recipe)")
    return data


def _toml_error_position(message: str, text: str) -> str:
    """tomllib's ``"<what> (at line L, column C)"`` or ``"<what> (at end of document)"`` (Python 3.11
    keeps no line attributes) as ``"line L, column C: TOML syntax error: <what>"``; the end of the
    document is given as its last line and column, with the usual cause."""
    found = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", message)
    if found:
        what, line, column = found.group(1), int(found.group(2)), int(found.group(3))
        return f"line {line}, column {column}: TOML syntax error: {what}"
    found = re.fullmatch(r"(?s)(.*) \(at end of document\)", message)
    if found:
        lines = text.split("\n")
        return (f"line {len(lines)}, column {len(lines[-1]) + 1}: TOML syntax error: {found.group(1)} at the end of "
                "the file (an unclosed [ array, { table or quoted string?)")
    return f"TOML syntax error: {message}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=100"`` -> (["train", "steps"], 100). The value is read as a TOML value
    (numbers, booleans, strings, arrays); anything that is not valid TOML is taken as a string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw recipe data (validation happens afterwards)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is a value, not a table")
            node = child
        node[parts[-1]] = value
    return data


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The recipe section class at ``loc`` (for suggesting keys), or None."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        args = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = args[0] if args else annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _format_validation_error(source: str, model: type[BaseModel], error: ValidationError) -> RecipeError:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
            lines.append(f"  {path}: unknown key{hint}")
        elif item["type"] == "string_pattern_mismatch" and item.get("ctx", {}).get("pattern") == NAME_PATTERN:
            # A name becomes a folder or file name in the run (skills/<name>/, experts/<name>.safetensors):
            # say so, rather than show the regular expression.
            lines.append(f"  {path}: expected lower-case letters, digits, '-' and '_', starting with a letter or digit "
                         f"(it names folders and files, so no '/', '.' or spaces), e.g. 'shape-count' (found {item.get('input')!r})")
        else:
            found = item.get("input")
            shown = "" if isinstance(found, (dict, list)) else f" (found {found!r})"
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {message}{shown}")
    return RecipeError(f"{source}: invalid recipe\n" + "\n".join(lines))


def _validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(source, model, exc) from None


def skill_recipe_from_dict(data: dict[str, Any], source: str = "<skill>") -> SkillRecipe:
    """Validate raw skill-recipe data; errors name ``source`` and the field path."""
    return _validate(SkillRecipe, data, source)


def _resolve_recipe_path(ref: str, base: Path | None, kind: str) -> Path:
    """A recipe reference: a path (relative to the referring recipe's folder) or a shipped name."""
    path = Path(ref).expanduser()
    candidates = [(base / path).resolve()] if base is not None and not path.is_absolute() else []
    if path.resolve() not in candidates:
        candidates.append(path.resolve())
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = (shipped_skill if kind == "skill" else shipped_run)(ref)
    if shipped is not None and "/" not in ref and not ref.endswith(".toml"):
        return shipped
    tried = ", ".join(str(c) for c in candidates)
    raise RecipeError(f"{kind} recipe {ref!r} not found (looked at {tried}, and for a shipped {kind} of that name)")


def load_skill_recipe(ref: str | Path, overrides: list[str] | None = None) -> SkillRecipe:
    """Load a skill recipe from a path or a shipped name (``"countbench"``)."""
    path = _resolve_recipe_path(str(ref), None, "skill")
    data = apply_overrides(read_toml(path), overrides or [])
    return skill_recipe_from_dict(data, str(path))


def load_run_recipe(ref: str | Path, overrides: list[str] | None = None) -> RunRecipe:
    """Load a run recipe (path or shipped name such as ``"demo"``) with its skill recipes.

    ``skills`` entries are paths relative to the run recipe, shipped skill names, tables
    ``{ recipe = "countbench", num_prompts = 24 }`` (a skill file with values replaced), or whole
    inline skill tables (as in a resolved recipe). Overrides address the run (``train.steps=100``) or one
    skill (``skills.countbench.num_prompts=10``).
    """
    path = _resolve_recipe_path(str(ref), None, "run")
    data = read_toml(path)
    run_overrides, skill_overrides = [], {}
    for text in overrides or []:
        parts, _ = parse_override(text)
        if parts[0] == "skills" and len(parts) >= 3:
            skill_overrides.setdefault(parts[1], []).append(text.split(".", 2)[2])
        else:
            run_overrides.append(text)
    data = apply_overrides(data, run_overrides)
    raw_skills = data.get("skills", [])
    if not isinstance(raw_skills, list):
        raise RecipeError(f"{path}: skills: expected a list of skill recipe paths or tables")
    skills = []
    for index, entry in enumerate(raw_skills):
        if isinstance(entry, str):
            skill_path = _resolve_recipe_path(entry, path.parent, "skill")
            skill_data, source = read_toml(skill_path), str(skill_path)
        elif isinstance(entry, dict) and "recipe" in entry:
            # { recipe = "countbench", num_prompts = 24 }: a skill file with some values replaced.
            skill_path = _resolve_recipe_path(str(entry["recipe"]), path.parent, "skill")
            skill_data, source = _deep_merge(read_toml(skill_path), {k: v for k, v in entry.items() if k != "recipe"}), str(skill_path)
        elif isinstance(entry, dict):
            skill_data, source = dict(entry), f"{path} (skills[{index}])"
        else:
            raise RecipeError(f"{path}: skills[{index}]: expected a path or a table, found {entry!r}")
        name = skill_data.get("name")
        apply_overrides(skill_data, skill_overrides.pop(name, []))
        skills.append(skill_recipe_from_dict(skill_data, source))
    if skill_overrides:
        known = [s.name for s in skills]
        raise RecipeError(f"--set skills.{next(iter(skill_overrides))}...: no such skill in this run; its skills are {known}")
    data["skills"] = skills
    return _validate(RunRecipe, data, str(path))


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(ref: str | Path, overrides: list[str] | None = None) -> SkillRecipe | RunRecipe:
    """Load either kind: a file with ``base_model`` is a run recipe, otherwise a skill recipe."""
    try:
        path = _resolve_recipe_path(str(ref), None, "run")
    except RecipeError:
        path = _resolve_recipe_path(str(ref), None, "skill")
    data = read_toml(path)
    if "base_model" in data or "skills" in data:
        return load_run_recipe(path, overrides)
    return load_skill_recipe(path, overrides)


def _drop_none(value: Any) -> Any:
    # TOML has no null: an unset optional value is left out (it reloads as its default, None).
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def resolved_toml(recipe: SkillRecipe | RunRecipe) -> str:
    """The fully resolved recipe as TOML (skills inline), loadable again with load_recipe."""
    return tomli_w.dumps(_drop_none(recipe.model_dump(mode="json")))


def recipe_hash(recipe: SkillRecipe | RunRecipe) -> str:
    """sha256 of the resolved recipe's canonical JSON: equal recipes, equal hashes."""
    canonical = json.dumps(recipe.model_dump(mode="json", context={"hash": True}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_resolved_recipe(recipe: SkillRecipe | RunRecipe, folder: str | Path) -> Path:
    """Write ``recipe.toml`` (fully resolved) and ``recipe.sha256`` into ``folder``; return the TOML path."""
    from selma_toolkit.io import atomic_write_text

    folder = Path(folder)
    path = folder / "recipe.toml"
    atomic_write_text(path, resolved_toml(recipe))
    atomic_write_text(folder / "recipe.sha256", recipe_hash(recipe) + "\n")
    return path
