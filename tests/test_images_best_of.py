"""Best-of-N images (`[images] candidates = N`, `judge = ...`): N candidates per prompt, the
judge's best kept, every candidate's score recorded, resumable, the judge loaded once, and a judge
that cannot score every prompt refused when the recipe loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_images import SKILL, documented_seed, make_run, pixels, write_recipe

from selma_toolkit.errors import RecipeError
from selma_toolkit.images import generate_images
from selma_toolkit.images.best_of import _cached_judge, candidate_seed, choose
from selma_toolkit.recipe import load_run_recipe

JUDGED = dict(candidates=3, judge="clipscore", judge_model="tiny:clip")


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def draw_with_diffusers(model_dir, prompt: str, seed: int):
    """The image the stage's settings give for one prompt and seed, drawn by plain diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=7.5,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def test_choose_prefers_the_highest_score_the_first_of_ties_and_never_none():
    assert choose([1.0, 3.0, 2.0]) == 1
    assert choose([2.0, 2.0, 1.0]) == 0
    assert choose([None, 0.5, None]) == 1
    assert choose([None, None]) == 0


def test_candidate_zero_is_the_plain_stage_image_seed_and_the_others_differ():
    assert candidate_seed(7, 3, 0) == documented_seed(7, 3)
    seeds = {candidate_seed(7, 3, k) for k in range(8)}
    assert len(seeds) == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares with CPU-drawn images")
def test_best_of_n_keeps_the_judges_best_candidate_and_records_every_score(tiny_sd1, tmp_path):
    from PIL import Image

    from selma_toolkit.config.evaluate import EvaluateSettings
    from selma_toolkit.evaluate.scorers import build_scorer

    run, paths, texts = make_run(tmp_path, tiny_sd1, 3, **JUDGED)
    stats = generate_images(run, SKILL, paths)
    assert stats.generated == 3
    folder = paths.images(SKILL)
    judge = build_scorer("clipscore", EvaluateSettings(clip_model="tiny:clip"))
    for row, text in zip(rows(folder), texts):
        assert row["judge"] == "clipscore(tiny:clip)" and len(row["candidates"]) == 3
        seeds = [candidate_seed(run.images.seed, row["prompt_id"], k) for k in range(3)]
        assert [c["seed"] for c in row["candidates"]] == seeds
        # Independently: draw each candidate with diffusers and score it with the same CLIP.
        drawn = [draw_with_diffusers(tiny_sd1, text, seed) for seed in seeds]
        expected = judge.score(drawn, [text] * 3)
        assert [c["score"] for c in row["candidates"]] == pytest.approx(expected, abs=1e-3)
        assert row["chosen"] == int(np.argmax(expected)) and row["seed"] == seeds[row["chosen"]]
        kept = pixels(folder / row["file_name"])
        assert np.abs(kept - np.asarray(drawn[row["chosen"]].convert("RGB"), dtype=np.int16)).max() <= 2
        with Image.open(folder / row["file_name"]) as image:
            assert image.size == (32, 32)


def test_best_of_n_resumes_without_redrawing_finished_prompts_and_loads_the_judge_once(tiny_sd1, tmp_path):
    _cached_judge.cache_clear()
    run, paths, _ = make_run(tmp_path, tiny_sd1, 4, **JUDGED)
    generate_images(run, SKILL, paths)
    folder = paths.images(SKILL)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".png", ".json")}
    # A kill between the image and its caption (or before the candidates' record) leaves a prompt undone.
    (folder / "000002.txt").unlink()
    (folder / "000003.judge.json").unlink()
    stats = generate_images(run, SKILL, paths)
    assert (stats.generated, stats.skipped) == (2, 2)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".png", ".json")}
    assert after == before  # the redrawn prompts give the same candidates, scores and choice
    assert [row["prompt_id"] for row in rows(folder)] == [0, 1, 2, 3]
    assert _cached_judge.cache_info().misses == 1  # one judge for both calls of this process
    # Nothing left to do: no model is loaded at all.
    assert generate_images(run, SKILL, paths).generated == 0


def test_resuming_with_another_judge_or_candidate_count_is_refused(tiny_sd1, tmp_path):
    from selma_toolkit.errors import DatasetError

    run, paths, _ = make_run(tmp_path, tiny_sd1, 1, **JUDGED)
    generate_images(run, SKILL, paths)
    changed = load_run_recipe(write_recipe(tmp_path, tiny_sd1, **{**JUDGED, "candidates": 2}))
    with pytest.raises(DatasetError, match=r"candidates: 3 -> 2"):
        generate_images(changed, SKILL, paths)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ({"candidates": 4}, "candidates = 4 needs a judge"),
        ({"candidates": 2, "judge": "questions"}, "judge = 'questions' cannot score every prompt"),
        ({"judge": "toyworld", "judge_model": "tiny:clip"}, "judge = 'toyworld' has no model"),
    ],
)
def test_a_judge_that_cannot_choose_is_refused_when_the_recipe_loads(images, message, tmp_path):
    with pytest.raises(RecipeError, match=message):
        load_run_recipe(write_recipe(tmp_path, "tiny:sd1", **images))


def test_dpo_judge_needs_an_images_judge(tmp_path):
    path = write_recipe(tmp_path, "tiny:sd1")
    with pytest.raises(RecipeError, match=r"dpo.scorer = \"judge\" picks DPO's pairs with images.judge"):
        load_run_recipe(path, ["dpo.scorer=judge"])
    run = load_run_recipe(path, ["dpo.scorer=judge", "images.judge=clipscore", "images.judge_model=tiny:clip"])
    assert run.dpo.scorer == "judge"
