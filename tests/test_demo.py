"""The shipped demo (`selma demo`): SELMA on the shapes world, offline, no API key, on the pretrained
toy base `toy:shapes`, scored exactly. The recipe is checked here and run end to end (made smaller);
`selma run tiny-demo` (every stage on the random tiny model) runs in test_run_demo.py."""

from __future__ import annotations

import json

import pytest

from selma_toolkit.config.recipes import merge_methods
from selma_toolkit.recipe import load_run_recipe

TOY_SKILLS = ["toy-count", "toy-color", "toy-spatial"]


def test_demo_recipe_needs_no_network_and_no_api_key():
    run = load_run_recipe("demo")
    assert run.base_model == "toy:shapes" and run.images.model is None  # shipped as package data
    assert [skill.name for skill in run.skills] == TOY_SKILLS
    assert all(skill.source == "grammar" for skill in run.skills)  # no LLM endpoint
    assert not run.experts  # nothing to pull from the Hub
    assert run.evaluate.scorers == ["toyworld"]  # exact scores, no scorer model to download


def test_demo_recipe_exercises_every_stage():
    run = load_run_recipe("demo")
    assert run.evaluate.prompts_per_skill > 0 and run.evaluate.select_checkpoints
    assert run.train.steps // run.train.checkpoint_every >= 2  # checkpoint selection has a choice
    assert merge_methods(run) == ["selma", "delta"]  # the paper's merge, compared with the exact average


@pytest.mark.slow
def test_selma_demo_runs_the_loop_on_the_toy_base_and_scores_it_exactly(tmp_path, cli):
    small = [
        "images.steps=4",
        "train.steps=4",
        "train.checkpoint_every=2",
        "evaluate.prompts_per_skill=3",
        "evaluate.bootstrap_samples=100",
        *[f"skills.{skill}.num_prompts=6" for skill in TOY_SKILLS],
    ]
    args = ["demo", "--out", str(tmp_path)]
    for override in small:
        args += ["--set", override]
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert list(scores["scorers"]) == ["toyworld"]
    assert {"base", "merged:selma", "merged:delta", *(f"expert:{s}" for s in TOY_SKILLS)} <= set(scores["variants"])
    values = [item["scores"]["toyworld"] for item in scores["items"]]
    assert values and all(0.0 <= v <= 100.0 for v in values)
    assert (tmp_path / "report" / "index.html").is_file()
    assert "report:" in result.stdout
