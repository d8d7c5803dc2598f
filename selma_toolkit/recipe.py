"""Recipes: TOML files -> validated objects.

The recipe classes and every stage's section are defined in :mod:`selma_toolkit.config`
(``config/recipes.py``: ``SkillRecipe``, ``RunRecipe``); this module reads them from TOML files and
shipped names, and is their public import path (``from selma_toolkit.recipe import RunRecipe``).

Unknown keys are errors, with the closest valid key suggested. ``--set a.b=value`` overrides are
parsed as TOML values, then validated like the file. ``resolved_toml`` / ``recipe_hash`` give the
fully resolved recipe that each run writes next to its outputs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from selma_toolkit.config.base import NAME_PATTERN, PLACEHOLDER, Fraction, Name, PositiveInt, StrictModel
from selma_toolkit.config.evaluate import EvaluateSettings, ScorerName
from selma_toolkit.config.images import ImageSettings
from selma_toolkit.config.merge import MergeSettings
from selma_toolkit.config.prompts import GrammarSettings, LLMSettings, PromptSourceName
from selma_toolkit.config.recipes import RunRecipe, SkillRecipe
from selma_toolkit.config.train import UNET_TARGET_MODULES, DPOSettings, MoESettings, TrainSettings
from selma_toolkit.errors import DatasetError, Fields, Option, RecipeError, Remedy
from selma_toolkit.io import atomic_write_text
from selma_toolkit.paths import RunPaths
from selma_toolkit.resources import shipped_run, shipped_skill

# The recipe classes and sections, importable from here as from selma_toolkit.config.
__all__ = [
    "NAME_PATTERN",
    "PLACEHOLDER",
    "UNET_TARGET_MODULES",
    "DPOSettings",
    "EvaluateSettings",
    "Fraction",
    "GrammarSettings",
    "ImageSettings",
    "LLMSettings",
    "MergeSettings",
    "MoESettings",
    "Name",
    "PositiveInt",
    "PromptSourceName",
    "RunRecipe",
    "ScorerName",
    "SkillRecipe",
    "StrictModel",
    "TrainSettings",
    "apply_overrides",
    "changed_fields",
    "load_recipe",
    "load_run_folder",
    "load_run_recipe",
    "load_skill_recipe",
    "parse_override",
    "read_toml",
    "recipe_hash",
    "resolved_toml",
    "skill_recipe_from_dict",
    "write_resolved_recipe",
]

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
        raise RecipeError(
            f"{path}: {what}; expected a TOML recipe (see `selma recipe show tiny-demo` for a run "
            "recipe, `selma skill new NAME` for a skill recipe)"
        )
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
        return (
            f"line {len(lines)}, column {len(lines[-1]) + 1}: TOML syntax error: {found.group(1)} at the end of "
            "the file (an unclosed [ array, { table or quoted string?)"
        )
    return f"TOML syntax error: {message}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=100"`` -> (["train", "steps"], 100). The value is read as a TOML value
    (numbers, booleans, strings, arrays); anything that is not valid TOML is taken as a string."""
    if "=" not in text:
        raise RecipeError(what="", where=Option("overrides"), found=text, expected="KEY=VALUE, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(what="empty key", where=Option("overrides"), found=text)
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
                raise RecipeError(what=f"{part!r} is a value, not a table", where=Option("overrides"), found=text)
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


# pydantic's wording of the common type and range errors -> what a recipe expects ("expected an integer").
_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string (in quotes)",
    "list_type": "a list [...]",
    "dict_type": "a table",
    "model_type": "a table",
}
_EXPECTED_RANGE = {
    "greater_than_equal": ("ge", "{} or more"),
    "greater_than": ("gt", "more than {}"),
    "less_than_equal": ("le", "{} or less"),
    "less_than": ("lt", "less than {}"),
}


def _problem(model: type[BaseModel], item: Any) -> str:
    """One validation error of pydantic's, without its field path: what was expected."""
    loc, kind, ctx = tuple(item["loc"]), item["type"], item.get("ctx", {})
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
        return "unknown key" + hint
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
        # A name becomes a folder or file name in the run (skills/<name>/, experts/<name>.safetensors):
        # say so, rather than show the regular expression.
        return (
            "expected lower-case letters, digits, '-' and '_', starting with a letter or digit (it names folders "
            "and files, so no '/', '.' or spaces), e.g. 'shape-count'"
        )
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}"
    if kind in _EXPECTED_RANGE and _EXPECTED_RANGE[kind][0] in ctx:
        bound, text = _EXPECTED_RANGE[kind]
        return "expected " + text.format(ctx[bound])
    if kind == "literal_error":
        return "expected " + item["msg"].removeprefix("Input should be ")
    return item["msg"].removeprefix("Value error, ")


def _format_validation_error(
    source: str, model: type[BaseModel], error: ValidationError, overrides: dict[tuple[str, ...], str]
) -> RecipeError:
    """One RecipeError for every problem pydantic found, a line each naming the field, or the ``overrides``
    entry (key path -> the ``--set`` text) that set it; one line only when an override is the one problem."""
    lines: list[str | Fields] = []
    for item in error.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        keys = tuple(str(p) for p in loc if not isinstance(p, int))
        override = next((text for key, text in overrides.items() if keys[: len(key)] == key), None)
        problem = _problem(model, item)
        if override is not None:
            lines.append(Fields(problem, (Option("overrides"),), override))
            continue
        found = item.get("input")
        shown = "" if isinstance(found, (dict, list)) or item["type"] == "extra_forbidden" else f" (found {found!r})"
        lines.append(f"{path}: {problem}{shown}")
    if all(isinstance(line, Fields) for line in lines):  # only overrides are wrong, not the file
        if len(lines) == 1:
            return RecipeError(what=lines[0].what, where=lines[0].where, found=lines[0].found)  # type: ignore[union-attr]
        return RecipeError(what="invalid values", where=Option("overrides"), details=lines)
    return RecipeError(what="invalid recipe", where=source, details=lines)


def _override_paths(overrides: list[str], skip: int = 0) -> dict[tuple[str, ...], str]:
    """Each override's key path (its first ``skip`` parts left out) -> its text, for naming it in errors."""
    return {tuple(parse_override(text)[0][skip:]): text for text in overrides}


def _validate(
    model: type[BaseModel], data: dict[str, Any], source: str, overrides: dict[tuple[str, ...], str] | None = None
) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(source, model, exc, overrides or {}) from None


def skill_recipe_from_dict(
    data: dict[str, Any], source: str = "<skill>", overrides: list[str] | None = None, skip: int = 0
) -> SkillRecipe:
    """Validate raw skill-recipe data; errors name ``source`` and the field path, or the entry of
    ``overrides`` (already applied to ``data``; their key paths after the first ``skip`` parts) that set it."""
    return _validate(SkillRecipe, data, source, _override_paths(overrides or [], skip))


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
    return skill_recipe_from_dict(data, str(path), overrides)


def load_run_recipe(ref: str | Path, overrides: list[str] | None = None) -> RunRecipe:
    """Load a run recipe (path or shipped name such as ``"demo"``) with its skill recipes.

    ``skills`` entries are paths relative to the run recipe, shipped skill names, tables
    ``{ recipe = "countbench", num_prompts = 24 }`` (a skill file with values replaced), or whole
    inline skill tables (as in a resolved recipe). Overrides address the run (``train.steps=100``) or one
    skill (``skills.countbench.num_prompts=10``).
    """
    path = _resolve_recipe_path(str(ref), None, "run")
    data = read_toml(path)
    run_overrides: list[str] = []
    skill_overrides: dict[str, list[str]] = {}
    for text in overrides or []:
        parts, _ = parse_override(text)
        if parts[0] == "skills" and len(parts) >= 3:
            skill_overrides.setdefault(parts[1], []).append(text)
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
            skill_data, source = (
                _deep_merge(read_toml(skill_path), {k: v for k, v in entry.items() if k != "recipe"}),
                str(skill_path),
            )
        elif isinstance(entry, dict):
            skill_data, source = dict(entry), f"{path} (skills[{index}])"
        else:
            raise RecipeError(f"{path}: skills[{index}]: expected a path or a table, found {entry!r}")
        own = skill_overrides.pop(skill_data.get("name"), [])  # type: ignore[arg-type]
        apply_overrides(skill_data, [text.split(".", 2)[2] for text in own])
        skills.append(skill_recipe_from_dict(skill_data, source, own, skip=2))
    if skill_overrides:
        known = [s.name for s in skills]
        raise RecipeError(
            what=f"no such skill in this run; its skills are {known}",
            where=Option("overrides"),
            found=next(iter(skill_overrides.values()))[0],
        )
    data["skills"] = skills
    return _validate(RunRecipe, data, str(path), _override_paths(run_overrides))


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_run_folder(folder: str | Path) -> tuple[RunRecipe, RunPaths]:
    """The recipe recorded in a run folder (``recipe.toml``) and the folder's paths."""
    paths = RunPaths(Path(folder))
    if not paths.recipe.is_file():
        raise DatasetError(
            what="not a run folder (no recipe.toml)",
            where=str(folder),
            expected="a folder written by `selma run`",
            remedies=[Remedy.run("selma run RECIPE --out FOLDER", note="to give the recipe")],
        )
    return load_run_recipe(paths.recipe), paths


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
    canonical = json.dumps(
        recipe.model_dump(mode="json", context={"hash": True}), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def changed_fields(old: BaseModel, new: BaseModel, prefix: str, skip: Collection[str] = frozenset()) -> list[str]:
    """``"<prefix><key>: old -> new"`` for every field (nested tables flattened) of two recipe
    sections that differs, but the keys in ``skip``; what the run checks name (stages/)."""
    # context "hash": an unset train.target_modules compares as the list that was the default (config/train.py),
    # so run folders recorded before the default became per-family continue.
    dump: dict[str, Any] = {"mode": "json", "context": {"hash": True}}
    before, after = _flat(old.model_dump(**dump), prefix), _flat(new.model_dump(**dump), prefix)
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if key.removeprefix(prefix) not in skip and before.get(key) != after.get(key)
    ]


def write_resolved_recipe(recipe: SkillRecipe | RunRecipe, folder: str | Path) -> Path:
    """Write ``recipe.toml`` (fully resolved) and ``recipe.sha256`` into ``folder``; return the TOML path."""
    folder = Path(folder)
    path = folder / "recipe.toml"
    atomic_write_text(path, resolved_toml(recipe))
    atomic_write_text(folder / "recipe.sha256", recipe_hash(recipe) + "\n")
    return path
