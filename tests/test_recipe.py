"""Recipes: shipped ones validate, defaults are the paper's, bad input gives clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma_toolkit.errors import RecipeError
from selma_toolkit.recipe import (
    RunRecipe,
    SkillRecipe,
    load_recipe,
    load_run_recipe,
    load_skill_recipe,
    recipe_hash,
    resolved_toml,
    write_resolved_recipe,
)
from selma_toolkit.resources import shipped_dir

SHIPPED = sorted(shipped_dir("recipes").glob("*/*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.name


def test_paper_skills_and_settings_are_shipped():
    run = load_run_recipe("sd2-selma")
    assert [s.name for s in run.skills] == ["coco", "localized-narratives", "diffusiondb", "countbench", "whoops"]
    assert run.base_model == "stabilityai/stable-diffusion-2"
    assert (run.images.steps, run.images.guidance_scale, run.images.resolution) == (50, 7.5, 768)
    assert (
        run.train.rank,
        run.train.learning_rate,
        run.train.batch_size,
        run.train.steps,
        run.train.checkpoint_every,
    ) == (128, 3e-4, 64, 5000, 1000)
    assert run.merge.method == "selma"
    countbench = run.skill("countbench")
    assert countbench.seeds[0] == "background photo of three light bulbs"
    assert countbench.similarity_threshold == 0.8 and countbench.num_prompts == 1000
    assert load_run_recipe("sd15-selma").base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_defaults_are_the_papers_numbers():
    skill = SkillRecipe(name="s", instruction="make {n}", seeds=["a", "b", "c"])
    assert (skill.num_prompts, skill.similarity_threshold, skill.examples_per_request, skill.prompts_per_request) == (
        1000,
        0.8,
        3,
        20,
    )
    assert (skill.llm.temperature, skill.llm.top_p, skill.llm.max_tokens, skill.llm.concurrency) == (1.0, 1.0, 3072, 5)
    run = RunRecipe(name="r", base_model="tiny:sd1", skills=[skill])
    assert (run.images.steps, run.images.guidance_scale) == (50, 7.5)
    assert (run.train.rank, run.train.effective_alpha, run.train.learning_rate) == (128, 128.0, 3e-4)
    assert (run.train.batch_size, run.train.steps, run.train.checkpoint_every) == (64, 5000, 1000)


def test_overrides_are_typed_and_reach_skills():
    run = load_run_recipe(
        "tiny-demo",
        [
            "train.steps=7",
            "train.learning_rate=0.5",
            "skills.count-grammar.num_prompts=3",
            "images.negative_prompt=blurry",
        ],
    )
    assert run.train.steps == 7 and run.train.learning_rate == 0.5
    assert run.skill("count-grammar").num_prompts == 3
    assert run.skill("spatial-grammar").num_prompts == 16  # the demo's own value, untouched
    assert run.images.negative_prompt == "blurry"


def test_override_with_wrong_type_names_the_field():
    with pytest.raises(RecipeError, match=r"train\.steps"):
        load_run_recipe("tiny-demo", ["train.steps=many"])


def test_resolved_recipe_round_trips_with_the_same_hash(tmp_path):
    run = load_run_recipe("tiny-demo", ["train.steps=3"])
    path = write_resolved_recipe(run, tmp_path)
    again = load_recipe(path)
    assert isinstance(again, RunRecipe)
    assert again == run
    assert recipe_hash(again) == recipe_hash(run) == (tmp_path / "recipe.sha256").read_text().strip()
    assert recipe_hash(load_run_recipe("tiny-demo", ["train.steps=4"])) != recipe_hash(run)
    assert "[train]" in resolved_toml(run)


def test_skill_entry_table_replaces_values(tmp_path):
    (tmp_path / "run.toml").write_text(
        'name = "r"\nbase_model = "tiny:sd1"\nskills = [{ recipe = "countbench", num_prompts = 5, llm = { model = "m" } }]\n'
    )
    skill = load_run_recipe(tmp_path / "run.toml").skill("countbench")
    assert skill.num_prompts == 5 and skill.llm.model == "m" and skill.llm.api == "completions"


def _write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    path = _write(tmp_path, 'name = "r"\nbase_model = \n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "column" in message


def test_unknown_key_is_named_with_the_closest_valid_key(tmp_path):
    path = _write(tmp_path, 'name = "r"\nbase_model = "tiny:sd1"\nskills = ["countbench"]\n[train]\nsetps = 5\n')
    with pytest.raises(RecipeError, match=r"train\.setps: unknown key; did you mean 'steps'\?"):
        load_recipe(path)


@pytest.mark.parametrize(
    "text, field",
    [
        ("[train]\nsteps = -5\n", "train.steps"),
        ("[images]\nsteps = 0\n", "images.steps"),
        ("[images]\nresolution = 100\n", "images.resolution"),
        ("[train]\nrank = 0\n", "train.rank"),
        ("[train]\nbatch_size = 64\nmicro_batch_size = 5\n", "train"),
    ],
)
def test_out_of_range_run_values_name_the_field(tmp_path, text, field):
    path = _write(tmp_path, 'name = "r"\nbase_model = "tiny:sd1"\nskills = ["countbench"]\n' + text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"  {field}" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "text, field",
    [
        ('similarity_threshold = 1.5\nseeds = ["a", "b", "c"]\ninstruction = "x"\n', "similarity_threshold"),
        ('similarity_threshold = -0.1\nseeds = ["a", "b", "c"]\ninstruction = "x"\n', "similarity_threshold"),
        ('seeds = ["a", "b"]\ninstruction = "x"\n', "seeds"),
        ('seeds = ["a", "b", "c"]\ninstruction = "  "\n', "instruction"),
        ('seeds = ["a", "b", "c"]\nsource = "grammar"\n', "grammar"),
    ],
)
def test_bad_skill_values_name_the_field(tmp_path, text, field):
    path = _write(tmp_path, 'name = "s"\n' + text, "s.toml")
    with pytest.raises(RecipeError) as info:
        load_skill_recipe(path)
    assert field in str(info.value) and str(path) in str(info.value)


def test_grammar_slot_without_words_is_an_error(tmp_path):
    path = _write(
        tmp_path,
        'name = "g"\nsource = "grammar"\nseeds = ["a", "b", "c"]\n[grammar]\n'
        'templates = ["{count} {thing}s"]\n[grammar.words]\ncount = ["two"]\n',
        "g.toml",
    )
    with pytest.raises(RecipeError, match=r"\{thing\}"):
        load_skill_recipe(path)


def test_missing_skill_file_names_the_path(tmp_path):
    path = _write(tmp_path, 'name = "r"\nbase_model = "tiny:sd1"\nskills = ["skills/nope.toml"]\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(tmp_path / "skills" / "nope.toml") in str(info.value)


def test_bad_value_inside_a_skill_file_names_that_file(tmp_path):
    _write(tmp_path, 'name = "s"\ninstruction = "x"\nseeds = ["a", "b", "c"]\nnum_prompts = 0\n', "s.toml")
    path = _write(tmp_path, 'name = "r"\nbase_model = "tiny:sd1"\nskills = ["s.toml"]\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(tmp_path / "s.toml") in str(info.value) and "num_prompts" in str(info.value)


def test_duplicate_skills_are_refused(tmp_path):
    path = _write(tmp_path, 'name = "r"\nbase_model = "tiny:sd1"\nskills = ["countbench", "countbench"]\n')
    with pytest.raises(RecipeError, match="countbench"):
        load_recipe(path)
