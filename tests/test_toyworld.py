"""The shapes world: caption grammar, ground-truth renders, and the exact DSG-style scorer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from selma_toolkit.toyworld.renderer import PlacedObject, draw_objects, render_caption, shape_mask
from selma_toolkit.toyworld.scorer import ToyWorldScorer, caption_questions, score_image, segment
from selma_toolkit.toyworld.world import CaptionError, Group, Scene, parse_caption

TOY_SKILLS = ("toy-count", "toy-color", "toy-spatial")


@pytest.fixture(scope="module")
def skill_prompts(tmp_path_factory) -> dict[str, list[str]]:
    """Train and held-out prompts of every shipped toy skill, from the offline grammar source."""
    from selma_toolkit.dataset import read_prompts
    from selma_toolkit.prompts import generate_prompts
    from selma_toolkit.recipe import load_skill_recipe

    folder = tmp_path_factory.mktemp("toy-prompts")
    prompts = {}
    for name in TOY_SKILLS:
        skill = load_skill_recipe(name).model_copy(update={"num_prompts": 120})
        generate_prompts(skill, folder / f"{name}.jsonl", heldout=60)
        prompts[name] = [record.prompt for record in read_prompts(folder / f"{name}.jsonl")]
    return prompts


def test_every_toy_skill_prompt_parses_and_its_ground_truth_render_scores_100(skill_prompts):
    for skill, prompts in skill_prompts.items():
        assert len(prompts) == 180 and len(set(prompts)) == 180, skill
        for index, prompt in enumerate(prompts):
            assert score_image(render_caption(prompt, index), prompt) == 100.0, (skill, prompt)


def test_caption_parser_reads_counts_colours_and_relations():
    assert parse_caption("two red circles and a white square") == Scene(
        groups=(Group(2, "circle", "red"), Group(1, "square", "white"))
    )
    assert parse_caption("a triangle above a blue diamond.") == Scene(
        groups=(Group(1, "triangle"), Group(1, "diamond", "blue")), relation="above"
    )
    for bad in (
        "two red circle",
        "a red circles",
        "five squares",
        "a cat",
        "two circles to the left of a square",
        "three squares and two circles",
    ):
        with pytest.raises(CaptionError):
            parse_caption(bad)


def test_questions_follow_dsg_dependencies():
    questions = caption_questions(parse_caption("a red circle to the left of a square"))
    assert [(q.text, q.parents) for q in questions] == [
        ("is there a circle?", ()),
        ("is the circle red?", ("1",)),
        ("is there a square?", ()),
        ("is the red circle to the left of the square?", ("1", "3")),
    ]


def _image(*objects: tuple[str, str, int, int]) -> Image.Image:
    return draw_objects([PlacedObject(shape, color, left, top, 10) for shape, color, left, top in objects])


def test_segmentation_finds_each_object_with_its_colour_shape_and_centre():
    image = _image(
        ("circle", "red", 2, 3), ("triangle", "blue", 18, 2), ("diamond", "white", 4, 19), ("square", "yellow", 20, 20)
    )
    found = sorted((s.color, s.shape, s.center) for s in segment(image))
    # Centres are pixel centroids: symmetric shapes centre in their box, a triangle lower (mass near its base).
    triangle_rows = np.nonzero(shape_mask("triangle", 10, 10))[0]
    assert found == [
        ("blue", "triangle", (22.5, pytest.approx(2 + triangle_rows.mean()))),
        ("red", "circle", (6.5, 7.5)),
        ("white", "diamond", (8.5, 23.5)),
        ("yellow", "square", (24.5, 24.5)),
    ]


def test_wrong_images_lose_exactly_the_questions_they_fail():
    left_blue_circle = _image(("circle", "blue", 2, 10), ("square", "red", 20, 11))
    # 5 questions: circle, circle blue, square, square red, relation.
    assert score_image(left_blue_circle, "a blue circle to the left of a red square") == 100.0
    assert score_image(left_blue_circle, "a blue circle to the right of a red square") == pytest.approx(80.0)
    # Colours swapped: both colour questions fail, and so does the relation between a red circle and a blue square.
    assert score_image(left_blue_circle, "a red circle to the left of a blue square") == pytest.approx(40.0)
    two_circles = _image(("circle", "red", 2, 2), ("circle", "red", 18, 18))
    assert score_image(two_circles, "two red circles") == 100.0
    assert score_image(two_circles, "three red circles") == pytest.approx(100 * 2 / 3)
    assert score_image(two_circles, "two green circles") == pytest.approx(100 / 3)


def test_child_questions_of_a_missing_object_count_as_wrong():
    image = _image(("square", "red", 2, 2))
    # Entity "triangle?" fails, so its colour and count questions fail with it (DSG rule): 0 of 3.
    assert score_image(image, "two red triangles") == 0.0
    # The square's two questions hold, the triangle's two fail: 2 of 4.
    assert score_image(image, "a red square and a green triangle") == 50.0


def test_noise_and_blank_images_score_zero():
    rng = np.random.default_rng(0)
    for _ in range(20):
        noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert score_image(noise, "a red circle and a blue square") == 0.0
    assert score_image(Image.new("RGB", (32, 32)), "a red circle") == 0.0


def test_upscaled_renders_score_like_the_original():
    image = render_caption("three yellow diamonds", random.Random(3))
    assert score_image(image.resize((256, 256), Image.Resampling.NEAREST), "three yellow diamonds") == 100.0


def test_toyworld_scorer_is_built_by_evaluate_and_skips_prompts_outside_the_grammar():
    from selma_toolkit.evaluate import build_scorers
    from selma_toolkit.recipe import EvaluateSettings

    [scorer] = build_scorers(EvaluateSettings(scorers=["toyworld"]))
    assert isinstance(scorer, ToyWorldScorer) and scorer.name == "toyworld"
    image = render_caption("a green square and a purple circle", 1)
    assert scorer.score([image, image], ["a green square and a purple circle", "a photo of a dog"]) == [100.0, None]


def test_cli_render_writes_the_image_and_answers_its_questions(cli, tmp_path):
    out = tmp_path / "render.png"
    result = cli("toyworld", "render", "two blue squares and a red triangle", "--out", str(out), "--scale", "4")
    assert result.returncode == 0, result.stderr
    assert "are there exactly two blue squares? -> yes" in result.stdout
    with Image.open(out) as image:
        assert image.size == (128, 128)
    scored = cli("toyworld", "score", str(out), "two blue squares and a red triangle")
    assert scored.returncode == 0 and "score 100.0" in scored.stdout
    bad = cli("toyworld", "render", "a purple elephant", "--out", str(out))
    assert bad.returncode == 2 and "a purple elephant" in bad.stderr and "Traceback" not in bad.stderr


def test_study_summary_gains_and_retention_match_a_direct_computation(tmp_path):
    from selma_toolkit.toyworld.study_report import summarise

    rng = np.random.default_rng(1)
    expected: dict[str, list[float]] = {"base": [], "expert": [], "merged:selma": []}
    for seed in (0, 1):
        folder = tmp_path / f"seed-{seed}"
        (folder / "eval").mkdir(parents=True)
        items = []
        for prompt_id in range(30):
            base = float(rng.integers(0, 5) * 25)
            values = {
                "base": base,
                "expert": min(100.0, base + 25 * rng.integers(0, 3)),
                "merged:selma": min(100.0, base + 25 * rng.integers(0, 2)),
            }
            for variant, value in values.items():
                expected[variant].append(value)
                name = "expert:toy-count" if variant == "expert" else variant
                items.append(
                    {
                        "variant": name,
                        "skill": "toy-count",
                        "prompt_id": prompt_id,
                        "seed": seed,
                        "scores": {"toyworld": value},
                    }
                )
            # An expert of another skill scored on this skill is not part of the study's rows.
            items.append(
                {
                    "variant": "expert:toy-color",
                    "skill": "toy-count",
                    "prompt_id": prompt_id,
                    "seed": seed,
                    "scores": {"toyworld": 0.0},
                }
            )
        (folder / "eval" / "scores.json").write_text(json.dumps({"items": items}))
        (folder / "replicate.json").write_text(json.dumps({"train_images": {"selma": {"toy-count": 30}}}))
    summary = summarise(tmp_path, ["toy-count"])
    base, expert, merged = (np.array(expected[k]) for k in ("base", "expert", "merged:selma"))
    assert summary["seeds"] == [0, 1]
    assert summary["scores"]["expert"]["toy-count"]["n"] == 60
    assert summary["scores"]["base"]["toy-count"]["mean"] == pytest.approx(base.mean())
    gain = summary["gains"]["expert"]["toy-count"]
    assert gain["mean"] == pytest.approx((expert - base).mean())
    assert gain["low"] <= gain["mean"] <= gain["high"]
    kept = summary["retention"]["merged:selma"]["toy-count"]
    assert kept["ratio"] == pytest.approx((merged - base).mean() / (expert - base).mean())
    assert summary["scores"]["base"]["toy-count"]["per_seed"] == {
        "0": pytest.approx(base[:30].mean(), abs=0.01),
        "1": pytest.approx(base[30:].mean(), abs=0.01),
    }


def test_filtered_dataset_keeps_per_prompt_the_first_candidate_that_reaches_the_score(tmp_path):
    from selma_toolkit.dataset import read_image_dataset
    from selma_toolkit.paths import RunPaths
    from selma_toolkit.toyworld.study_data import write_dataset, write_filtered

    first, second, target = (
        RunPaths(tmp_path / "selma"),
        RunPaths(tmp_path / "candidates-1"),
        RunPaths(tmp_path / "filtered"),
    )
    captions = [
        "two red circles",
        "a blue square and a green triangle",
        "a white diamond above a purple circle",
        "a red square",
    ]
    blank = Image.new("RGB", (32, 32))
    # Prompt 0: right in both (the first is kept); 1: right only in the second; 2: right only in the first; 3: never.
    right = {(first, 0), (second, 0), (second, 1), (first, 2)}
    for source in (first, second):
        examples = [
            (i, "toy-count", c, render_caption(c, i) if (source, i) in right else blank) for i, c in enumerate(captions)
        ]
        write_dataset(source.images("toy-count"), examples, {})
    assert write_filtered([first, second], "toy-count", target, 100.0) == (3, 4)
    kept = {record.extra["prompt_id"]: record for record in read_image_dataset(target.images("toy-count"))}
    assert sorted(kept) == [0, 1, 2]
    origin = {0: first, 1: second, 2: first}
    for prompt_id, record in kept.items():
        assert record.path.read_bytes() == (origin[prompt_id].images("toy-count") / record.path.name).read_bytes()


def test_retention_is_undefined_unless_the_experts_gain_is_significant(tmp_path):
    from selma_toolkit.toyworld.study_report import summarise

    folder = tmp_path / "seed-0"
    (folder / "eval").mkdir(parents=True)
    items = []
    for prompt_id in range(40):
        base = 50.0
        # The expert's gain alternates +1 / -1 (mean 0: nothing to keep); the merge's is +1.
        values = {"base": base, "expert:toy-count": base + (1 if prompt_id % 2 else -1), "merged:selma": base + 1}
        items += [
            {"variant": v, "skill": "toy-count", "prompt_id": prompt_id, "seed": 0, "scores": {"toyworld": x}}
            for v, x in values.items()
        ]
    (folder / "eval" / "scores.json").write_text(json.dumps({"items": items}))
    (folder / "replicate.json").write_text(json.dumps({"train_images": {}}))
    summary = summarise(tmp_path, ["toy-count"])
    assert summary["gains"]["expert"]["toy-count"]["low"] < 0
    assert summary["retention"]["merged:selma"]["toy-count"] == {"ratio": None, "low": None, "high": None}
    met = [row["met"] for row in summary["targets"] if "keeps" in row["target"]]
    assert met == [False]
