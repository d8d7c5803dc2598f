"""Question-based faithfulness: a VQA model answers questions about each image.

The answerer ranks a question's candidate answers by their likelihood under a generative BLIP VQA
model (``BlipForQuestionAnswering``; BLIP's own "rank" inference): for each candidate, the
decoder's log-probability of ``[answer tokens] [SEP]`` after its start token, given the question
encoded against the image. Yes/no questions are a two-way choice, so the tiny random model and a
real one go through the same code.

* ``questions`` (DSG / TIFA style): per image, 100 x the share of its prompt's questions answered
  correctly. DSG's dependency rule: a question whose parent was answered wrongly counts as wrong
  whatever the model says about it (``dsg_score``).
* ``vqascore``: 100 x P(yes) (normalised over yes/no) for ``Does this figure show "<prompt>"?
  Please answer yes or no.`` (VQAScore's question), for prompts without a question file.

Scores depend on the VQA model: the paper's DSG used mPLUG-large and TIFA BLIP-2, so numbers are
comparable only between runs that used the same ``vqa_model``; the report says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from selma_toolkit.errors import ModelError
from selma_toolkit.evaluate.questions import Question, QuestionSet, read_questions
from selma_toolkit.evaluate.scorers import load_pretrained
from selma_toolkit.models import default_device

if TYPE_CHECKING:
    from PIL.Image import Image

    from selma_toolkit.config.evaluate import EvaluateSettings

VQASCORE_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'
COMPARABILITY_NOTE = ("Scores from a VQA model are comparable only between runs that used the same VQA model "
                      "(the paper used mPLUG-large for DSG and BLIP-2 for TIFA).")


def dsg_score(questions: Sequence[Question], answers: Mapping[str, str]) -> tuple[float, dict[str, bool]]:
    """100 x the share of ``questions`` answered correctly, with DSG's dependency rule.

    ``questions`` must list parents before children (QuestionSet does); ``answers`` maps every
    question id to the model's answer. A question counts as correct only if its answer equals the
    expected one *and* every parent counts as correct: DSG does not ask a child whose parent got
    "no", and scores it as wrong, which gives the same number.
    """
    correct: dict[str, bool] = {}
    for question in questions:
        parents_ok = all(correct[parent] for parent in question.parents)
        correct[question.id] = parents_ok and answers[question.id] == question.answer
    if not correct:
        raise ValueError("dsg_score needs at least one question")
    return 100.0 * sum(correct.values()) / len(correct), correct


class BlipAnswerer:
    """Log-likelihoods of candidate answers under a ``BlipForQuestionAnswering`` model."""

    def __init__(self, model_id: str, device: str | None = None):
        self.model_id = model_id
        self.device = device
        self._model: Any = None
        self._processor: Any = None

    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoProcessor, BlipForQuestionAnswering

        self.device = self.device or default_device()
        model = load_pretrained(BlipForQuestionAnswering, self.model_id, "vqa_model")
        self._processor = load_pretrained(AutoProcessor, self.model_id, "vqa_model", weights=False)
        self._model = model.to(self.device).eval()

    def choice_logprobs(self, image: "Image", questions: Sequence[str], choices: Sequence[Sequence[str]]) -> list[list[float]]:
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
                input_ids=asked["input_ids"], attention_mask=asked["attention_mask"],
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
            )[0]
            results = []
            for index, candidates in enumerate(choices):
                answer_ids = [[text_config.bos_token_id] + tokenizer(c, add_special_tokens=False)["input_ids"]
                              + [text_config.sep_token_id] for c in candidates]
                length = max(len(ids) for ids in answer_ids)
                decoder_ids = torch.full((len(candidates), length), text_config.pad_token_id, dtype=torch.long)
                decoder_mask = torch.zeros((len(candidates), length), dtype=torch.long)
                for row, ids in enumerate(answer_ids):
                    decoder_ids[row, :len(ids)] = torch.tensor(ids)
                    decoder_mask[row, :len(ids)] = 1
                decoder_ids, decoder_mask = decoder_ids.to(device), decoder_mask.to(device)
                count = len(candidates)
                # Only this question's own tokens: with transformers 5.24 a padded encoder_attention_mask
                # in BLIP's decoder cross-attention still lets padding through (logits move by ~1e-3).
                own = int(asked["attention_mask"][index].sum())
                memory = question_embeds[index:index + 1, :own].expand(count, -1, -1)
                logits = model.text_decoder(
                    input_ids=decoder_ids, attention_mask=decoder_mask, encoder_hidden_states=memory,
                    encoder_attention_mask=torch.ones(memory.shape[:-1], dtype=torch.long, device=device),
                    return_logits=True,
                ).float()  # [count, length - 1, vocab]: predictions for positions 1..length-1
                logprobs = torch.log_softmax(logits, dim=-1).gather(-1, decoder_ids[:, 1:, None]).squeeze(-1)
                results.append((logprobs * decoder_mask[:, 1:]).sum(dim=-1).cpu().tolist())
        return results


def _check_lengths(images: Sequence[Any], prompts: Sequence[str], name: str) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{name}: {len(images)} images but {len(prompts)} prompts")


class VqaScoreScorer:
    """100 x P(yes | image, 'does this figure show "<prompt>"?'), normalised over yes and no."""

    name, label = "vqascore", "VQAScore"

    def __init__(self, model_id: str, device: str | None = None):
        self.model_id = model_id
        self.description = f"100 x P(yes) that the image shows the prompt, answered by {model_id}. {COMPARABILITY_NOTE}"
        self.answerer = BlipAnswerer(model_id, device)

    def score(self, images: Sequence["Image"], prompts: Sequence[str]) -> list[float | None]:
        _check_lengths(images, prompts, self.name)
        scores: list[float | None] = []
        for image, prompt in zip(images, prompts):
            [[yes, no]] = self.answerer.choice_logprobs(image, [VQASCORE_TEMPLATE.format(prompt=prompt)], [("yes", "no")])
            scores.append(100.0 / (1.0 + math.exp(no - yes)))
        return scores


class QuestionScorer:
    """DSG/TIFA-style faithfulness: questions about each prompt answered by the VQA model."""

    name, label = "questions", "Question faithfulness"

    def __init__(self, questions: QuestionSet, model_id: str, device: str | None = None):
        self.questions = questions
        self.model_id = model_id
        # Cached scores (score_variants) depend on the questions too: a changed file is scored again.
        canonical = json.dumps({p: [dataclasses.astuple(q) for q in qs] for p, qs in questions.by_prompt.items()}, sort_keys=True)
        self.cache_key = f"{model_id}|questions:{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:16]}"
        self.description = (f"100 x share of the prompt's questions ({questions.source}) answered correctly by {model_id}, "
                            f"DSG dependency rule. {COMPARABILITY_NOTE}")
        self.answerer = BlipAnswerer(model_id, device)

    def answers(self, image: "Image", questions: Sequence[Question]) -> dict[str, str]:
        """The model's chosen answer to each question (the most likely of its choices)."""
        logprobs = self.answerer.choice_logprobs(image, [q.text for q in questions], [q.choices for q in questions])
        return {q.id: q.choices[max(range(len(q.choices)), key=row.__getitem__)] for q, row in zip(questions, logprobs)}

    def score(self, images: Sequence["Image"], prompts: Sequence[str]) -> list[float | None]:
        _check_lengths(images, prompts, self.name)
        scores: list[float | None] = []
        for image, prompt in zip(images, prompts):
            questions = self.questions.for_prompt(prompt)
            scores.append(None if questions is None else dsg_score(questions, self.answers(image, questions))[0])
        return scores


# ------------------------------------------------------------------------- registry factories


def build_vqascore(settings: "EvaluateSettings", device: str | None = None) -> VqaScoreScorer:
    """The ``vqascore`` scorer of the registry (evaluate/scorers.py ``SCORERS``)."""
    return VqaScoreScorer(settings.vqa_model, device)


def build_question_scorer(settings: "EvaluateSettings", device: str | None = None) -> QuestionScorer:
    """The ``questions`` scorer of the registry: the recipe's question file, answered by vqa_model."""
    if not settings.questions:
        raise ModelError("scorer 'questions' needs evaluate.questions (a DSG/TIFA-style question file or dataset id)")
    return QuestionScorer(read_questions(settings.questions, settings.questions_split), settings.vqa_model, device)
