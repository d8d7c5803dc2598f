"""Question-based faithfulness: a VQA model answers questions about each image.

Two kinds of VQA model answer, chosen from the model's config on first use (``vqa_answerer``):

* BLIP's VQA model (``BlipForQuestionAnswering``, e.g. ``Salesforce/blip-vqa-base``): a question's
  candidate answers ranked by their likelihood under its answer decoder (BLIP's own "rank"
  inference): for each candidate, the decoder's log-probability of ``[answer tokens] [SEP]`` after
  its start token, given the question encoded against the image (``BlipAnswerer``);
* any image-text-to-text model of transformers (BLIP-2, InstructBLIP, PaliGemma, LLaVA,
  Qwen2.5-VL, ...): the likelihood of each candidate answer under the model's own prompt or chat
  template (selma_toolkit.evaluate.vlm).

Yes/no questions are a two-way choice, so the tiny random models and real ones go through the same code.

* ``questions`` (DSG / TIFA style): per image, 100 x the share of its prompt's questions answered
  correctly. DSG's dependency rule: a question whose parent was answered wrongly counts as wrong
  whatever the model says about it (``dsg_score``).
* ``vqascore``: 100 x P(yes) for ``Does this figure show "<prompt>"? Please answer yes or no.``
  (VQAScore's question), for prompts without a question file. An image-text-to-text model gives
  P(yes) as VQAScore defines it (the probability of the answer "yes", spelt "yes" or "Yes"); BLIP's
  VQA model's yes and no are normalised over the two (its answer decoder spreads mass over every
  answer string).

Every image's questions are answered together, batched over images and questions.

Scores depend on the VQA model: the paper's DSG used mPLUG-large and TIFA BLIP-2, so numbers are
comparable only between runs that used the same ``vqa_model``; the report says so (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from selma_toolkit.errors import ModelError
from selma_toolkit.evaluate.questions import Question, QuestionSet, read_questions
from selma_toolkit.evaluate.scorers import load_pretrained, resolve_scorer_model
from selma_toolkit.evaluate.vlm import Ask, VlmAnswerer
from selma_toolkit.models import default_device
from selma_toolkit.tiny import TINY_VLMS, is_tiny_spec

if TYPE_CHECKING:
    from PIL.Image import Image

    from selma_toolkit.config.evaluate import EvaluateSettings

VQASCORE_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'
COMPARABILITY_NOTE = (
    "Scores from a VQA model are comparable only between runs that used the same VQA model "
    "(the paper used mPLUG-large for DSG and BLIP-2 for TIFA)."
)


def dsg_score(
    questions: Sequence[Question], answers: Mapping[str, str], *, transitive: bool = True
) -> tuple[float, dict[str, bool]]:
    """100 x the share of ``questions`` answered correctly, with DSG's dependency rule.

    ``answers`` maps every question id to the model's answer. A question counts as correct only if
    its answer equals the expected one *and* its parents pass: DSG does not ask a child whose parent
    got "no", and scores it as wrong, which gives the same number. ``transitive`` (this toolkit's
    rule, and DPG-Bench's code): a parent passes if it counts as correct, so a failure runs down a
    chain; ``questions`` list parents before children (QuestionSet does), else a parent not yet
    reached passes on its own answer (DPG-Bench's code, which walks its file in order). Not
    ``transitive`` (DSG-1k's released code): a parent passes on its own answer alone.
    """
    own = {question.id: answers[question.id] == question.answer for question in questions}
    correct: dict[str, bool] = {}
    for question in questions:
        passes = correct.get if transitive else own.get
        correct[question.id] = own[question.id] and all(passes(p, own.get(p, True)) for p in question.parents)
    if not correct:
        raise ValueError("dsg_score needs at least one question")
    return 100.0 * sum(correct.values()) / len(correct), correct


class Answerer(Protocol):
    """What the scorers need from a VQA model."""

    yes_no_normalised: bool  # whether VQAScore's P(yes) is normalised over yes and no (BLIP VQA)

    def answer_logprobs(self, asks: Sequence[Ask]) -> list[list[float]]:
        """For each ask, the log-probability of each of its choices."""
        ...


@functools.lru_cache(maxsize=2)
def load_blip_vqa(model_id: str, device: str) -> tuple[Any, Any]:
    """A BLIP VQA model and its processor on ``device``, loaded once per process and device."""
    from transformers import AutoProcessor, BlipForQuestionAnswering

    model = load_pretrained(BlipForQuestionAnswering, model_id, "vqa_model")
    processor = load_pretrained(AutoProcessor, model_id, "vqa_model", weights=False)
    return model.to(device).eval(), processor


class BlipAnswerer:
    """Log-likelihoods of candidate answers under a ``BlipForQuestionAnswering`` model."""

    yes_no_normalised = True

    def __init__(self, model_id: str, device: str | None = None):
        self.model_id = model_id
        self.device = device
        self._model: Any = None
        self._processor: Any = None

    def _ensure_loaded(self) -> None:
        if self._model is None:
            self.device = self.device or default_device()
            self._model, self._processor = load_blip_vqa(self.model_id, self.device)

    def answer_logprobs(self, asks: Sequence[Ask]) -> list[list[float]]:
        """For each ask, the log-probability of each of its choices; the questions about one image
        (consecutive asks with the same image) are encoded together."""
        results: list[list[float]] = []
        start = 0
        while start < len(asks):
            end = start + 1
            while end < len(asks) and asks[end].image is asks[start].image:
                end += 1
            group = asks[start:end]
            results += self.choice_logprobs(group[0].image, [a.question for a in group], [a.choices for a in group])
            start = end
        return results

    def choice_logprobs(
        self, image: Image, questions: Sequence[str], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """For one image: for each question, the log-probability of each of its candidate answers."""
        import torch

        self._ensure_loaded()
        model, tokenizer, device = self._model, self._processor.tokenizer, self.device
        text_config = model.config.text_config
        with torch.no_grad():
            pixels = self._processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"].to(device)
            image_embeds = model.vision_model(pixel_values=pixels)[0]
            asked = tokenizer(list(questions), padding=True, truncation=True, return_tensors="pt").to(device)
            image_embeds = image_embeds.expand(len(questions), -1, -1)
            question_embeds = model.text_encoder(
                input_ids=asked["input_ids"],
                attention_mask=asked["attention_mask"],
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
            )[0]
            results = []
            for index, candidates in enumerate(choices):
                answer_ids = [
                    [text_config.bos_token_id]
                    + tokenizer(c, add_special_tokens=False)["input_ids"]
                    + [text_config.sep_token_id]
                    for c in candidates
                ]
                length = max(len(ids) for ids in answer_ids)
                decoder_ids = torch.full((len(candidates), length), text_config.pad_token_id, dtype=torch.long)
                decoder_mask = torch.zeros((len(candidates), length), dtype=torch.long)
                for row, ids in enumerate(answer_ids):
                    decoder_ids[row, : len(ids)] = torch.tensor(ids)
                    decoder_mask[row, : len(ids)] = 1
                decoder_ids, decoder_mask = decoder_ids.to(device), decoder_mask.to(device)
                count = len(candidates)
                # Only this question's own tokens: with transformers 5.24 a padded encoder_attention_mask
                # in BLIP's decoder cross-attention still lets padding through (logits move by ~1e-3).
                own = int(asked["attention_mask"][index].sum())
                memory = question_embeds[index : index + 1, :own].expand(count, -1, -1)
                logits = model.text_decoder(
                    input_ids=decoder_ids,
                    attention_mask=decoder_mask,
                    encoder_hidden_states=memory,
                    encoder_attention_mask=torch.ones(memory.shape[:-1], dtype=torch.long, device=device),
                    return_logits=True,
                ).float()  # [count, length - 1, vocab]: predictions for positions 1..length-1
                logprobs = torch.log_softmax(logits, dim=-1).gather(-1, decoder_ids[:, 1:, None]).squeeze(-1)
                results.append((logprobs * decoder_mask[:, 1:]).sum(dim=-1).cpu().tolist())
        return results


def _check_lengths(images: Sequence[Any], prompts: Sequence[str], name: str) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{name}: {len(images)} images but {len(prompts)} prompts")


def is_blip_vqa(model_id: str) -> bool:
    """Whether ``model_id`` is a BLIP VQA model (else an image-text-to-text model), from its config."""
    if is_tiny_spec(model_id):
        return model_id.removeprefix("tiny:") not in TINY_VLMS
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_scorer_model(model_id, "vqa_model"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            what=f"could not read the config of {model_id} ({exc})",
            where="vqa_model",
            found=model_id,
            expected="a local folder or Hub id of a BLIP VQA or image-text-to-text model",
        ) from None
    return "BlipForQuestionAnswering" in (getattr(config, "architectures", None) or [])


class VqaAnswerer:
    """The answerer of ``model_id``: BLIP's VQA model or an image-text-to-text model, chosen and loaded
    on the first question, so that building a scorer stays cheap."""

    def __init__(self, model_id: str, device: str | None = None, dtype: str = "auto", batch_size: int = 16):
        self.model_id, self.device, self.dtype, self.batch_size = model_id, device, dtype, batch_size
        self._backend: Answerer | None = None

    @property
    def backend(self) -> Answerer:
        if self._backend is None:
            self._backend = (
                BlipAnswerer(self.model_id, self.device)
                if is_blip_vqa(self.model_id)
                else VlmAnswerer(self.model_id, self.device, self.dtype, self.batch_size)
            )
        return self._backend

    @property
    def yes_no_normalised(self) -> bool:
        return self.backend.yes_no_normalised

    def answer_logprobs(self, asks: Sequence[Ask]) -> list[list[float]]:
        return self.backend.answer_logprobs(asks)


def model_key(settings: EvaluateSettings) -> str:
    """What the scores depend on besides the images: the VQA model, and its dtype where set."""
    return settings.vqa_model if settings.vqa_dtype == "auto" else f"{settings.vqa_model}|{settings.vqa_dtype}"


class VqaScoreScorer:
    """100 x P(yes | image, 'does this figure show "<prompt>"?')."""

    name, label = "vqascore", "VQAScore"

    def __init__(self, answerer: VqaAnswerer, cache_key: str):
        self.model_id = answerer.model_id
        self.cache_key = cache_key
        self.description = (
            f"100 x P(yes) that the image shows the prompt, answered by {self.model_id}. {COMPARABILITY_NOTE}"
        )
        self.answerer = answerer

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[float | None]:
        _check_lengths(images, prompts, self.name)
        asks = [
            Ask(image, VQASCORE_TEMPLATE.format(prompt=prompt), ("yes", "no"))
            for image, prompt in zip(images, prompts, strict=True)
        ]
        rows = self.answerer.answer_logprobs(asks) if asks else []
        if self.answerer.yes_no_normalised:
            return [100.0 / (1.0 + math.exp(no - yes)) for yes, no in rows]
        return [100.0 * math.exp(yes) for yes, _ in rows]


class QuestionScorer:
    """DSG/TIFA-style faithfulness: questions about each prompt answered by the VQA model."""

    name, label = "questions", "Question faithfulness"

    def __init__(self, questions: QuestionSet, answerer: VqaAnswerer, model_key: str, *, transitive: bool = True):
        self.questions = questions
        self.transitive = transitive  # dsg_score's rule
        self.model_id = answerer.model_id
        # Cached scores (score_variants) depend on the questions too: a changed file is scored again.
        canonical = json.dumps(
            {p: [dataclasses.astuple(q) for q in qs] for p, qs in questions.by_prompt.items()}, sort_keys=True
        )
        self.cache_key = f"{model_key}|questions:{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:16]}" + (
            "" if transitive else "|parents-by-own-answer"
        )
        self.description = (
            f"100 x share of the prompt's questions ({questions.source}) answered correctly by "
            f"{self.model_id}, DSG dependency rule. {COMPARABILITY_NOTE}"
        )
        self.answerer = answerer

    def answers(self, image: Image, questions: Sequence[Question]) -> dict[str, str]:
        """The model's chosen answer to each question (the most likely of its choices)."""
        return self.answer_many([image], [questions])[0]

    def answer_many(self, images: Sequence[Image], questions: Sequence[Sequence[Question]]) -> list[dict[str, str]]:
        """``answers`` for many images at once (one batch of asks over every image's questions)."""
        asks = [Ask(image, q.text, q.choices) for image, qs in zip(images, questions, strict=True) for q in qs]
        rows = iter(self.answerer.answer_logprobs(asks) if asks else [])
        return [
            {q.id: q.choices[max(range(len(q.choices)), key=row.__getitem__)] for q, row in zip(qs, rows, strict=False)}
            for qs in questions
        ]

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[float | None]:
        _check_lengths(images, prompts, self.name)
        asked = [(i, self.questions.for_prompt(p)) for i, p in enumerate(prompts)]
        asked = [(i, qs) for i, qs in asked if qs is not None]
        answers = self.answer_many([images[i] for i, _ in asked], [qs for _, qs in asked])
        scores: list[float | None] = [None] * len(images)
        for (i, qs), given in zip(asked, answers, strict=True):
            scores[i] = dsg_score(qs, given, transitive=self.transitive)[0]
        return scores


# ------------------------------------------------------------------------- registry factories


def vqa_answerer(settings: EvaluateSettings, device: str | None = None) -> VqaAnswerer:
    """The answerer of ``settings.vqa_model`` (its model loads on the first question, once per process)."""
    return VqaAnswerer(settings.vqa_model, device, settings.vqa_dtype, settings.batch_size)


def build_vqascore(settings: EvaluateSettings, device: str | None = None) -> VqaScoreScorer:
    """The ``vqascore`` scorer of the registry (config/registries.py ``SCORERS``); its model is
    ``vqa_model``, ``batch_size`` (image, question) pairs per forward pass."""
    return VqaScoreScorer(vqa_answerer(settings, device), model_key(settings))


def build_question_scorer(settings: EvaluateSettings, device: str | None = None) -> QuestionScorer:
    """The ``questions`` scorer of the registry: the recipe's question file, answered by vqa_model."""
    if not settings.questions:
        raise ModelError("scorer 'questions' needs evaluate.questions (a DSG/TIFA-style question file or dataset id)")
    return QuestionScorer(
        read_questions(settings.questions, settings.questions_split),
        vqa_answerer(settings, device),
        model_key(settings),
    )
