"""`toy:judge`: hard negatives that are false of the image, training that reproduces and resumes
bit for bit, prompts a study measures on never seen, and an export the clipscore scorer loads."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from selma_toolkit.toyworld.judge import (
    NEGATIVE_KINDS,
    JudgeSettings,
    export_judge,
    hard_negative,
    scene_caption,
    step_examples,
    train_judge,
)
from selma_toolkit.toyworld.world import parse_caption

TINY = dict(steps=4, batch_size=4, checkpoint_every=2, warmup_steps=1)


def grammar_captions(count: int) -> list[str]:
    from selma_toolkit.toyworld.pretrain import caption_sources

    captions, _, _ = step_examples(caption_sources(), JudgeSettings(batch_size=count), 0, set())
    return captions


def test_every_hard_negative_is_false_of_the_render_and_captions_round_trip():
    from selma_toolkit.toyworld.renderer import render_caption
    from selma_toolkit.toyworld.scorer import score_image

    rng = random.Random(0)
    for index, caption in enumerate(grammar_captions(150)):
        scene = parse_caption(caption)
        assert parse_caption(scene_caption(scene)) == scene
        image = render_caption(caption, index)
        assert score_image(image, caption) == 100.0
        for kind in NEGATIVE_KINDS:
            negative = scene_caption(hard_negative(scene, kind, rng))
            # The exact scorer, independently: the render does not show the negative caption.
            assert score_image(image, negative) < 100.0, (caption, kind, negative)


def test_training_reproduces_from_its_seed_and_resumes_bit_for_bit(tmp_path):
    whole = train_judge(tmp_path / "whole", JudgeSettings(**TINY))
    train_judge(tmp_path / "resumed", JudgeSettings(**{**TINY, "steps": 2}))
    resumed = train_judge(tmp_path / "resumed", JudgeSettings(**TINY))
    first, second = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = load_file(str(train_judge(tmp_path / "other", JudgeSettings(**{**TINY, "seed": 1})) / "model.safetensors"))
    assert not all(torch.equal(first[k], other[k]) for k in first)
    with pytest.raises(Exception, match=r"other settings \(batch_size: 4 -> 8\)"):
        train_judge(tmp_path / "whole", JudgeSettings(**{**TINY, "batch_size": 8}))


def test_the_judge_never_sees_a_heldout_or_development_prompt_of_its_study(tmp_path):
    from selma_toolkit.prompts.filters import normalized
    from selma_toolkit.toyworld.judge import excluded_prompts
    from selma_toolkit.toyworld.pretrain import caption_sources

    excluded = excluded_prompts("toy-study-3", tmp_path)
    assert len(excluded) == 600  # 100 held-out and 100 development prompts per skill, all distinct
    settings = JudgeSettings(batch_size=256, exclude_recipe="toy-study-3")
    seen = set()
    for step in range(4):
        captions, _, negatives = step_examples(caption_sources(), settings, step, excluded)
        seen |= {normalized(text) for text in captions + [n for row in negatives for n in row]}
    assert not seen & excluded
    # Without the exclusion the same stream does draw some of them: the filter is what keeps them out.
    unfiltered = set()
    for step in range(4):
        captions, _, negatives = step_examples(caption_sources(), JudgeSettings(batch_size=256), step, set())
        unfiltered |= {normalized(text) for text in captions + [n for row in negatives for n in row]}
    assert unfiltered & excluded


def test_exported_judge_loads_in_the_clipscore_scorer_and_records_its_rebuild(tmp_path):
    from selma_toolkit.config.evaluate import EvaluateSettings
    from selma_toolkit.evaluate.scorers import build_scorer
    from selma_toolkit.toyworld.renderer import render_caption

    train_judge(tmp_path / "run", JudgeSettings(**TINY))
    target = export_judge(tmp_path / "run", tmp_path / "judge")
    record = json.loads((target / "toyworld-judge.json").read_text())
    assert record["step"] == 4
    assert record["rebuild"][0].startswith("selma toyworld judge-train --out OUT --seed 0 --steps 4")
    assert set(record["caption_beats_hard_negative"]) == set(NEGATIVE_KINDS)
    assert {v.dtype for v in load_file(str(target / "model.safetensors")).values()} == {torch.float16}
    scorer = build_scorer("clipscore", EvaluateSettings(clip_model=str(target)))
    image = render_caption("two red circles", 0)
    values = scorer.score([image, image], ["two red circles", "three red circles"])
    assert len(values) == 2 and all(0.0 <= v <= 100.0 for v in values)


def test_shipped_judge_prefers_the_true_caption_to_its_hard_negatives():
    from selma_toolkit.config.evaluate import EvaluateSettings
    from selma_toolkit.evaluate.scorers import build_scorer
    from selma_toolkit.toyworld.renderer import render_caption

    scorer = build_scorer("clipscore", EvaluateSettings(clip_model="toy:judge"))
    rng = random.Random(1)
    wins = total = 0
    for index, caption in enumerate(grammar_captions(40)):
        image = render_caption(caption, 1000 + index)
        scene = parse_caption(caption)
        negatives = [scene_caption(hard_negative(scene, kind, rng)) for kind in NEGATIVE_KINDS]
        values = scorer.score([image] * 4, [caption, *negatives])
        wins += sum(values[0] > v for v in values[1:])
        total += 3
    assert wins / total > 0.8
