"""`selma skill new` (selma_toolkit/skill_new.py): a commented skill recipe that validates, marks
what its author must write, and is refused by every command until that is written."""

from __future__ import annotations

import re
import tomllib

import pytest

from selma_toolkit.cli.words import cli_message
from selma_toolkit.errors import RecipeError
from selma_toolkit.recipe import PLACEHOLDER, load_skill_recipe
from selma_toolkit.skill_new import new_skill_recipe


def top_level_keys(text: str) -> list[tuple[int, str]]:
    """(line index, key) of every key = value line before the first table."""
    lines = text.split("\n[", 1)[0].splitlines()
    return [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"^(\w+) = ", line))]


def test_new_skill_from_a_shipped_skill_keeps_every_value_but_the_name(tmp_path):
    made = new_skill_recipe("my-coco", tmp_path / "my-coco.toml", from_skill="coco")
    assert made.unfilled == [] and made.source == "llm"
    written, shipped = load_skill_recipe(made.path), load_skill_recipe("coco")
    assert written.name == "my-coco"
    assert written.model_dump(exclude={"name"}) == shipped.model_dump(exclude={"name"})


def test_every_field_has_a_comment_and_the_fields_to_write_are_marked_and_refused(tmp_path):
    made = new_skill_recipe("shape-count", tmp_path / "shape-count.toml")
    text = made.path.read_text()
    lines = text.splitlines()
    keys = top_level_keys(text)
    assert {k for _, k in keys} >= {
        "name",
        "description",
        "source",
        "instruction",
        "seeds",
        "num_prompts",
        "similarity_threshold",
        "max_words",
        "examples_per_request",
        "prompts_per_request",
        "seed",
    }
    assert all(lines[i - 1].startswith("#") for i, _ in keys), "a field without a comment above it"
    data = tomllib.loads(text)
    assert data["num_prompts"] == 1000 and data["similarity_threshold"] == 0.8 and data["examples_per_request"] == 3
    assert made.unfilled == ["description", "instruction", "seeds[0]", "seeds[1]", "seeds[2]"]
    with pytest.raises(RecipeError) as refused:
        load_skill_recipe(made.path)
    assert "description, instruction, seeds[0], seeds[1], seeds[2]: still hold the <fill in" in str(refused.value)
    # Written in, the same file is a valid llm skill recipe with the paper's request form.
    filled = re.sub(r"<fill in[^>]*>", "two cups on a table", text)
    (tmp_path / "filled.toml").write_text(filled)
    recipe = load_skill_recipe(tmp_path / "filled.toml")
    assert PLACEHOLDER not in recipe.instruction and "{n}" in recipe.instruction and "{max_words}" in recipe.instruction


def test_a_grammar_skill_filled_in_with_set_generates_its_prompts_offline(tmp_path):
    from selma_toolkit.dataset import read_prompts
    from selma_toolkit.prompts import generate_prompts

    made = new_skill_recipe(
        "shape-count",
        tmp_path / "shape-count.toml",
        source="grammar",
        overrides=[
            "description=Counting simple shapes.",
            'seeds=["two circles", "three squares on a table", "a photo of two stars"]',
            'grammar.templates=["{count} {color} {shape}s"]',
            'grammar.words.shape=["circle", "square", "star"]',
            "num_prompts=6",
        ],
    )
    assert made.unfilled == []
    skill = load_skill_recipe(made.path)
    assert skill.source == "grammar" and skill.grammar.words["shape"] == ["circle", "square", "star"]
    generate_prompts(skill, tmp_path / "prompts.jsonl")
    prompts = [r.prompt for r in read_prompts(tmp_path / "prompts.jsonl")]
    assert len(prompts) == 6 and all(re.fullmatch(r"(two|three) \w+ (circles|squares|stars)", p) for p in prompts)


def test_bad_names_existing_files_and_unknown_keys_are_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="skill name 'Shape Count': expected lower-case letters"):
        new_skill_recipe("Shape Count", tmp_path / "x.toml")
    (tmp_path / "taken.toml").write_text("keep me")
    with pytest.raises(RecipeError, match=r"taken\.toml: already exists") as refused:
        new_skill_recipe("taken", tmp_path / "taken.toml")
    assert cli_message(refused.value).endswith("Choose another --out or use --force (to replace it).")
    assert (tmp_path / "taken.toml").read_text() == "keep me"
    with pytest.raises(RecipeError, match="num_promts=5': unknown key; did you mean 'num_prompts'") as refused:
        new_skill_recipe("typo", tmp_path / "typo.toml", overrides=["num_promts=5"])
    assert cli_message(refused.value) == "--set num_promts=5: unknown key; did you mean 'num_prompts'?"
    assert not (tmp_path / "typo.toml").exists()


def test_cli_skill_new_writes_the_recipe_and_says_what_to_fill_in(tmp_path, cli):
    result = cli(
        "skill", "new", "whoops-mine", "--from", "whoops", "--source", "grammar", cwd=tmp_path, env={"COLUMNS": "200"}
    )
    assert result.returncode == 0, result.stderr
    assert "wrote skill recipe 'whoops-mine' (source grammar) to whoops-mine.toml" in result.stdout
    skill = load_skill_recipe(tmp_path / "whoops-mine.toml")  # whoops' seeds and instruction, a starter grammar
    assert skill.seeds == load_skill_recipe("whoops").seeds and skill.grammar is not None
    again = cli("skill", "new", "whoops-mine", "--from", "whoops", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
