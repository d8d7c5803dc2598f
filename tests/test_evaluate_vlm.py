"""The image-text-to-text VQA judges (selma_toolkit.evaluate.vlm) on tiny random BLIP-2 (Flan-T5),
PaliGemma and LLaVA models (and Qwen2.5-VL where torchvision is installed): each answer's
log-likelihood is checked against the model's own training loss on that answer, batched scoring
against one question at a time, VQAScore against P("yes") + P("Yes"), and the model loads once."""

from __future__ import annotations

import importlib.util
import math
import shutil

import pytest
import torch
from support_evaluate import drawn_image

from selma_toolkit.errors import ModelError
from selma_toolkit.evaluate import build_scorer
from selma_toolkit.evaluate.vlm import Ask, VlmAnswerer, load_vlm, spellings
from selma_toolkit.evaluate.vqa import VQASCORE_TEMPLATE, dsg_score
from selma_toolkit.recipe import EvaluateSettings
from selma_toolkit.tiny import ensure_tiny_scorer_model

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
JUDGES = [
    "blip2",
    "paligemma",
    "llava",
    pytest.param("qwen2.5-vl", marks=pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")),
]
ASKS = [
    ("is there a red cube?", ("yes", "no")),
    ("how many dogs are there?", ("one", "two", "three dogs")),
    ("what color is the ball?", ("red", "blue", "dark green")),
    ("is there a cat?", ("yes", "no")),
]


@pytest.fixture(scope="module")
def images():
    return [drawn_image(seed) for seed in range(3)]


def own_loss_logprob(name: str, image, question: str, answer: str) -> float:
    """log P(answer | image, question) from the model's own loss (mean token NLL x answer tokens),
    the answer's tokens told apart from the prompt's by the processor's lengths."""
    model, processor = load_vlm(f"tiny:{name}", "cpu", "auto")
    answerer = VlmAnswerer(f"tiny:{name}", "cpu")
    answerer._ensure_loaded()
    prompt = answerer.prompt(question)
    with torch.no_grad():
        if name == "blip2":  # Flan-T5: the answer is the decoder's target
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            labels = torch.tensor([processor.tokenizer(answer, add_special_tokens=False)["input_ids"]])
        elif name == "paligemma":  # the answer is the processor's suffix; its training labels end in <eos>
            inputs = processor(images=[image], text=[prompt], suffix=[answer], return_tensors="pt")
            labels = inputs.pop("labels")
            labels[0, -1] = -100
        else:  # chat models: the answer follows the generation prompt; only its tokens are labelled
            inputs = processor(
                images=[image], text=[prompt + answerer.answer_text(prompt, answer)], return_tensors="pt"
            )
            prompt_length = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
            labels = inputs["input_ids"].clone()
            labels[0, :prompt_length] = -100
        inputs.pop("labels", None)
        loss = model(**inputs, labels=labels).loss
    return -float(loss) * int(labels.ge(0).sum())


@pytest.mark.parametrize("name", JUDGES)
def test_answer_likelihoods_match_the_models_own_loss(name, images):
    asks = [Ask(images[i % 3], question, choices) for i, (question, choices) in enumerate(ASKS)]
    got = VlmAnswerer(f"tiny:{name}", "cpu", batch_size=8).answer_logprobs(asks)
    for ask, row in zip(asks, got, strict=True):
        expected = [
            math.log(sum(math.exp(own_loss_logprob(name, ask.image, ask.question, s)) for s in spellings(c)))
            for c in ask.choices
        ]
        assert row == pytest.approx(expected, abs=2e-4), ask.question


@pytest.mark.parametrize("name", JUDGES)
def test_batched_answers_equal_one_question_at_a_time(name, images):
    asks = [Ask(images[i % 3], question, choices) for i, (question, choices) in enumerate(ASKS * 2)]
    batched = VlmAnswerer(f"tiny:{name}", "cpu", batch_size=16).answer_logprobs(asks)
    alone = [VlmAnswerer(f"tiny:{name}", "cpu", batch_size=1).answer_logprobs([ask])[0] for ask in asks]
    for row, single in zip(batched, alone, strict=True):
        assert row == pytest.approx(single, abs=1e-4)


def test_vqascore_of_a_vlm_is_p_yes_spelt_either_way(images):
    prompts = ["a red cube", "two dogs"]
    scorer = build_scorer("vqascore", EvaluateSettings(scorers=["vqascore"], vqa_model="tiny:paligemma"))
    scores = scorer.score(images[:2], prompts)
    for image, prompt, score in zip(images, prompts, scores, strict=False):
        question = VQASCORE_TEMPLATE.format(prompt=prompt)
        p_yes = sum(math.exp(own_loss_logprob("paligemma", image, question, s)) for s in ("yes", "Yes"))
        assert score == pytest.approx(100 * p_yes, rel=1e-3)


def test_question_scorer_takes_each_questions_most_likely_choice_under_the_dsg_rule(tmp_path, images):
    path = tmp_path / "dsg.jsonl"
    path.write_text(
        '{"prompt": "a red cube", "question_id": 1, "question": "is there a cube?"}\n'
        '{"prompt": "a red cube", "question_id": 2, "question": "is the cube red?", "dependency": "1"}\n'
        '{"prompt": "a red cube", "question_id": 3, "question": "what color is the cube?", '
        '"choices": ["red", "blue", "dark green"], "answer": "red"}\n'
    )
    scorer = build_scorer(
        "questions", EvaluateSettings(scorers=["questions"], questions=str(path), vqa_model="tiny:llava")
    )
    [score] = scorer.score(images[:1], ["a red cube"])
    questions = scorer.questions.for_prompt("a red cube")
    answers = {}
    for question in questions:
        likelihoods = [
            sum(math.exp(own_loss_logprob("llava", images[0], question.text, s)) for s in spellings(c))
            for c in question.choices
        ]
        answers[question.id] = question.choices[likelihoods.index(max(likelihoods))]
    assert score == dsg_score(questions, answers)[0]


def test_the_judge_model_loads_once_per_process(monkeypatch):
    from transformers import AutoModelForImageTextToText

    loads = []
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(counted))
    load_vlm.cache_clear()
    settings = EvaluateSettings(scorers=["vqascore"], vqa_model="tiny:paligemma")
    first, second = build_scorer("vqascore", settings, "cpu"), build_scorer("vqascore", settings, "cpu")
    first.score([drawn_image(0)], ["a cube"])
    second.score([drawn_image(1)], ["a ball"])
    assert len(loads) == 1
    assert first.answerer.backend.model is second.answerer.backend.model


def test_a_model_without_a_prompt_form_is_a_clear_error(tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(ensure_tiny_scorer_model("tiny:llava"), folder)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelError, match="no chat template and no known VQA prompt"):
        VlmAnswerer(str(folder), "cpu").answer_logprobs([Ask(drawn_image(0), "is there a cube?", ("yes", "no"))])


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the message shown where torchvision is missing")
def test_qwen_without_torchvision_says_what_it_needs():
    scorer = build_scorer("vqascore", EvaluateSettings(scorers=["vqascore"], vqa_model="tiny:qwen2.5-vl"))
    with pytest.raises(ModelError, match="needs torchvision"):
        scorer.score([drawn_image(0)], ["a cube"])
