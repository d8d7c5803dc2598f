"""`selma run` without running the stages: which recipe changes a run folder accepts, which it
refuses (and how it says so), experts listed in the recipe that do not fit the base model, and the
status of a folder where nothing has run yet. The whole loop runs in test_run_demo.py."""

from __future__ import annotations

import pytest

from selma_toolkit.cli.words import cli_message
from selma_toolkit.errors import DatasetError, LoraFormatError, RecipeError
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import load_run_folder, load_run_recipe, write_resolved_recipe
from selma_toolkit.run import (
    check_recipe_change,
    run_pipeline,
    run_status,
)


@pytest.fixture
def recorded(tmp_path):
    """A run folder holding only the resolved demo recipe, as `selma run` writes it first."""
    paths = RunPaths(tmp_path / "run")
    write_resolved_recipe(load_run_recipe("tiny-demo"), paths.root)
    return paths


def demo(*overrides: str):
    return load_run_recipe("tiny-demo", list(overrides))


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


def test_any_change_is_accepted_while_no_output_depends_on_it(recorded):
    check_recipe_change(demo("images.steps=12", "train.rank=4", "skills.count-grammar.num_prompts=3"), recorded)


def test_changed_image_settings_are_refused_once_images_exist(recorded):
    touch(recorded.images("color-grammar") / "000000.txt")
    check_recipe_change(demo("images.batch_size=2"), recorded)  # how images are batched changes no pixel
    with pytest.raises(RecipeError) as refused:
        check_recipe_change(demo("images.steps=12", "images.guidance_scale=5.0"), recorded)
    message = str(refused.value)
    assert str(recorded.root) in message and "images exist for color-grammar" in message
    assert "images.steps: 10 -> 12" in message and "images.guidance_scale: 7.5 -> 5.0" in message
    assert "choose another --out" in cli_message(refused.value)


def test_changed_skill_recipe_is_refused_once_its_prompts_exist(recorded):
    touch(recorded.prompts("count-grammar"))
    check_recipe_change(demo("skills.spatial-grammar.num_prompts=3"), recorded)  # no prompts of that skill yet
    with pytest.raises(
        RecipeError, match=r"skills\.count-grammar\.num_prompts: 16 -> 3 \(prompts exist for count-grammar\)"
    ):
        check_recipe_change(demo("skills.count-grammar.num_prompts=3"), recorded)


def test_changed_training_settings_are_refused_once_an_expert_exists_but_more_steps_are_fine(recorded):
    touch(recorded.expert("count-grammar"))
    check_recipe_change(
        demo("train.steps=60", "train.checkpoint_every=5", "merge.method=delta", "evaluate.prompts_per_skill=2"),
        recorded,
    )
    with pytest.raises(RecipeError, match=r"train\.rank: 8 -> 4 \(experts trained or training: count-grammar\)"):
        check_recipe_change(demo("train.rank=4"), recorded)
    with pytest.raises(RecipeError, match=r"base_model: 'tiny:sd1'@None -> 'tiny:sd2'@None"):
        check_recipe_change(demo("base_model=tiny:sd2"), recorded)


def test_listed_expert_that_does_not_fit_the_base_model_fails_before_any_work(tmp_path, tiny_model_dirs):
    from diffusers import DiffusionPipeline
    from support_lora import random_lora

    from selma_toolkit.lora import lora_metadata, save_lora

    sdxl = DiffusionPipeline.from_pretrained(tiny_model_dirs["sdxl"])
    other_arch = save_lora(
        random_lora(sdxl, rank=8),
        tmp_path / "sdxl-expert.safetensors",
        metadata=lora_metadata(architecture="sdxl", skill="sdxl-skill"),
    )
    sd1 = DiffusionPipeline.from_pretrained(tiny_model_dirs["sd1"])
    other_rank = save_lora(
        random_lora(sd1, rank=4),
        tmp_path / "rank4.safetensors",
        metadata=lora_metadata(architecture="sd1", skill="rank4"),
    )
    out = tmp_path / "run"
    with pytest.raises(
        LoraFormatError, match=r"sdxl-expert\.safetensors.* is a LoRA for sdxl, but base_model 'tiny:sd1' is sd1"
    ):
        run_pipeline(demo(f'experts=["{other_arch}"]'), RunPaths(out))
    with pytest.raises(LoraFormatError, match=r"has rank \[4\], but the run trains rank 8.*merge.method = 'delta'"):
        run_pipeline(demo(f'experts=["{other_rank}"]'), RunPaths(out))
    assert not (out / "skills").exists()  # no prompt, image or expert was made
    # With the delta merge (exact sum of updates, any ranks) the expert fits; a wrong number of merge
    # weights is still an error before any work.
    with pytest.raises(LoraFormatError, match="weights: got 2 weight"):
        run_pipeline(
            demo(
                f'experts=["{other_rank}"]',
                "merge.method=delta",
                "evaluate.merge_methods=[]",
                "merge.weights=[0.5, 0.5]",
            ),
            RunPaths(out),
        )


def test_status_of_a_fresh_run_folder_lists_every_stage_still_to_do(recorded):
    run, paths = load_run_folder(recorded.root)
    states = run_status(run, paths)
    assert [(s.stage, s.target) for s in states] == [
        *[
            (stage, skill)
            for stage in ("prompts", "images", "train")
            for skill in ("count-grammar", "spatial-grammar", "color-grammar")
        ],
        ("select", ""),
        ("merge", "selma"),
        ("merge", "delta"),
        ("evaluate", ""),
    ]
    assert not any(s.done for s in states)
    assert states[0].detail == "0/16 train, 0/4 held-out"
    assert states[6].detail == "step 0/30, 0 checkpoint(s)"
    assert "waits for" in states[10].detail and "count-grammar.safetensors" in states[10].detail


def test_status_command_on_a_folder_without_a_recipe_says_what_it_expects(cli, tmp_path):
    result = cli("status", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a run folder (no recipe.toml)" in result.stderr
    with pytest.raises(DatasetError, match="selma run RECIPE --out FOLDER"):
        load_run_folder(tmp_path)
