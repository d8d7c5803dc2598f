"""Scorers on the tiny random models: each number is checked against an independent computation
from the model's own forward pass; pickled checkpoints need an opt-in and a pinned sha256."""

from __future__ import annotations

import math

import pytest
import torch
from support_evaluate import drawn_image, open_clip_state_dict

from selma_toolkit.errors import ModelError
from selma_toolkit.evaluate import build_scorer, build_scorers
from selma_toolkit.io import sha256_file
from selma_toolkit.recipe import EvaluateSettings

PROMPTS = ["a red cube", "a blue ball", "two dogs", "three cats on a table", "a green car", "a photo of a horse"]


@pytest.fixture(scope="module")
def images():
    return [drawn_image(i) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def tiny_clip():
    """The tiny CLIP loaded directly with transformers (not through the scorer)."""
    from transformers import AutoProcessor, CLIPModel

    from selma_toolkit.tiny import ensure_tiny_scorer_model

    path = ensure_tiny_scorer_model("tiny:clip")
    return CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def cosines_from_forward(model, processor, images, prompts) -> torch.Tensor:
    """cos(image_i, prompt_i) from CLIPModel.forward: the diagonal of logits_per_image / logit_scale."""
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    return torch.diagonal(logits) / model.logit_scale.exp()


def settings(**values) -> EvaluateSettings:
    base = dict(
        clip_model="tiny:clip",
        pickscore_model="tiny:clip",
        pickscore_processor=None,
        hps_model="tiny:clip",
        vqa_model="tiny:vqa",
    )
    return EvaluateSettings(**(base | values))


@pytest.mark.parametrize("name", ["clipscore", "pickscore", "hps"])
def test_clip_scorers_match_their_formula_on_the_models_own_cosines(name, images, tiny_clip):
    model, processor = tiny_clip
    cos = cosines_from_forward(model, processor, images, PROMPTS)
    expected = {
        "clipscore": 100 * cos.clamp(min=0),  # torchmetrics CLIPScore
        "pickscore": model.logit_scale.exp() * cos,  # the PickScore authors' code
        "hps": 100 * cos,  # HPS v2 reports cos as a percentage
    }[name]
    scores = build_scorer(name, settings()).score(images, PROMPTS)
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    if name == "clipscore":
        assert min(scores) == 0.0 and max(scores) > 0.0  # these prompts exercise the clamp both ways


def test_scorer_refuses_pickled_transformers_weights(tmp_path, tiny_clip):
    model, processor = tiny_clip
    folder = tmp_path / "pickled-clip"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the pickled layout older models ship
    processor.save_pretrained(folder)
    scorer = build_scorer("clipscore", settings(clip_model=str(folder)))
    with pytest.raises(ModelError, match="safetensors"):
        scorer.score([drawn_image(0)], ["a cube"])


def test_hps_pickled_checkpoint_is_refused_without_opt_in_or_pin(tmp_path):
    checkpoint = tmp_path / "hps.pt"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(ModelError, match=r"arbitrary code.*hps_allow_pickle = true.*hps_sha256"):
        build_scorer("hps", settings(hps_model=str(checkpoint)))
    with pytest.raises(ModelError, match="hps_sha256 is not set"):
        build_scorer("hps", settings(hps_model=str(checkpoint), hps_allow_pickle=True))
    wrong = build_scorer("hps", settings(hps_model=str(checkpoint), hps_allow_pickle=True, hps_sha256="0" * 64))
    with pytest.raises(ModelError, match="not the file you pinned"):
        wrong.score([drawn_image(0)], ["a cube"])


def test_hps_open_clip_checkpoint_scores_like_the_clip_it_holds(tmp_path, images, tiny_clip):
    model, processor = tiny_clip
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in open_clip_state_dict(model).items()}}, checkpoint)
    scorer = build_scorer(
        "hps",
        settings(
            hps_model=str(checkpoint),
            hps_clip_config="tiny:clip",
            hps_allow_pickle=True,
            hps_sha256=sha256_file(checkpoint),
        ),
    )
    expected = 100 * cosines_from_forward(model, processor, images, PROMPTS)
    assert scorer.score(images, PROMPTS) == pytest.approx(expected.tolist(), abs=1e-4)


def test_imagereward_needs_opt_in_pin_and_the_package(tmp_path):
    checkpoint = tmp_path / "ImageReward.pt"
    torch.save({}, checkpoint)
    with pytest.raises(ModelError, match="imagereward_allow_pickle = true"):
        build_scorer("imagereward", settings(imagereward_model=str(checkpoint)))
    with pytest.raises(ModelError, match="imagereward_sha256 is not set"):
        build_scorer("imagereward", settings(imagereward_model=str(checkpoint), imagereward_allow_pickle=True))
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match=r"pip install 'selma-toolkit\[eval\]'"):
            build_scorer(
                "imagereward",
                settings(
                    imagereward_model=str(checkpoint),
                    imagereward_allow_pickle=True,
                    imagereward_sha256=sha256_file(checkpoint),
                ),
            )


@pytest.fixture(scope="module")
def tiny_vqa():
    from transformers import AutoProcessor, BlipForQuestionAnswering

    from selma_toolkit.tiny import ensure_tiny_scorer_model

    path = ensure_tiny_scorer_model("tiny:vqa")
    return BlipForQuestionAnswering.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def answer_logprob_from_loss(model, processor, image, question: str, answer: str) -> float:
    """log P(answer [SEP] | image, question) from the model's own training loss (mean token NLL)."""
    config = model.config.text_config
    assert config.label_smoothing == 0.0
    inputs = processor(images=[image], text=[question], return_tensors="pt")
    labels = (
        [config.bos_token_id]
        + processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        + [config.sep_token_id]
    )
    with torch.no_grad():
        loss = model(**inputs, labels=torch.tensor([labels])).loss
    return -float(loss) * (len(labels) - 1)


def test_vqa_answer_likelihoods_match_the_models_own_loss(tiny_vqa):
    from selma_toolkit.evaluate.vqa import BlipAnswerer

    model, processor = tiny_vqa
    image = drawn_image(3)
    questions = ["is there a red cube?", "how many dogs are there?"]
    choices = [("yes", "no"), ("one", "two", "three dogs")]
    got = BlipAnswerer("tiny:vqa").choice_logprobs(image, questions, choices)
    for question, options, row in zip(questions, choices, got):
        expected = [answer_logprob_from_loss(model, processor, image, question, option) for option in options]
        assert row == pytest.approx(expected, abs=1e-4)


def test_vqascore_is_p_yes_among_yes_and_no(images, tiny_vqa):
    from selma_toolkit.evaluate.vqa import VQASCORE_TEMPLATE

    model, processor = tiny_vqa
    scores = build_scorer("vqascore", settings()).score(images[:2], PROMPTS[:2])
    for image, prompt, score in zip(images, PROMPTS, scores):
        question = VQASCORE_TEMPLATE.format(prompt=prompt)
        yes, no = (answer_logprob_from_loss(model, processor, image, question, a) for a in ("yes", "no"))
        assert score == pytest.approx(100 * math.exp(yes) / (math.exp(yes) + math.exp(no)), abs=1e-3)


def test_unknown_tiny_scorer_model_is_a_clear_error():
    scorer = build_scorer("clipscore", settings(clip_model="tiny:sd1"))
    with pytest.raises(ModelError, match=r"evaluate.clip_model = 'tiny:sd1'.*tiny:clip"):
        scorer.score([drawn_image(0)], ["a cube"])


def test_recipe_rejects_unknown_scorers_and_questions_without_a_file():
    from selma_toolkit.errors import RecipeError
    from selma_toolkit.recipe import load_run_recipe

    with pytest.raises(RecipeError, match=r"overrides \"evaluate\.scorers=\['dsg'\]\": expected .*'clipscore'"):
        load_run_recipe("tiny-demo", ["evaluate.scorers=['dsg']"])
    with pytest.raises(RecipeError, match="'questions' needs evaluate.questions"):
        load_run_recipe("tiny-demo", ["evaluate.scorers=['questions']"])
    with pytest.raises(RecipeError, match="hps_sha256"):
        load_run_recipe("tiny-demo", ["evaluate.hps_sha256='abc'"])
    recipe = load_run_recipe(
        "tiny-demo", ["evaluate.scorers=['clipscore', 'vqascore']", "evaluate.clip_model='tiny:clip'"]
    )
    assert [s.name for s in build_scorers(recipe.evaluate)] == ["clipscore", "vqascore"]
