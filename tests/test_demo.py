"""The shipped demo recipe (`selma demo`): it must run offline with no API key, on the embedded tiny
model, and exercise every stage of the loop. It runs end to end (made smaller) in test_run_demo.py."""

from __future__ import annotations

from selma_toolkit.recipe import load_run_recipe
from selma_toolkit.run import merge_methods


def test_demo_recipe_needs_no_network_and_no_api_key():
    run = load_run_recipe("demo")
    assert run.base_model.startswith("tiny:") and run.images.model is None
    assert all(skill.source == "grammar" for skill in run.skills)  # no LLM endpoint
    assert not run.experts  # nothing to pull from the Hub
    models = {"clipscore": run.evaluate.clip_model, "vqascore": run.evaluate.vqa_model}
    assert set(run.evaluate.scorers) <= set(models)
    assert all(models[name].startswith("tiny:") for name in run.evaluate.scorers)


def test_demo_recipe_exercises_every_stage():
    run = load_run_recipe("demo")
    assert 2 <= len(run.skills) <= 3
    assert run.evaluate.prompts_per_skill > 0 and run.evaluate.select_checkpoints
    assert run.train.steps // run.train.checkpoint_every >= 2  # checkpoint selection has a choice
    assert merge_methods(run) == ["selma", "delta"]  # the paper's merge, compared with the exact average
