"""VQA answers from transformers' image-text-to-text models (``AutoModelForImageTextToText``).

A question's candidate answers are ranked by their likelihood under the model, given the image and
the question in the model's own prompt form, so a yes/no question, a multiple-choice question
(TIFA) and VQAScore's P("yes") all come from the same numbers:

* ``blip-2``: ``Question: <q> Answer:`` (BLIP-2's zero-shot VQA prompt); the answer follows it (OPT)
  or is the decoder's (Flan-T5);
* ``instructblip``: ``Question: <q> Short answer:`` (InstructBLIP's VQA prompt), the same way;
* ``paligemma``: ``answer en <q>`` (PaliGemma's VQA task prefix); the answer is the processor's
  ``suffix`` (PaliGemma reads its prefix both ways and the suffix left to right);
* any other model whose processor has a chat template (LLaVA, Qwen2.5-VL, ...): a user turn of the
  image and the question; the answer is the assistant's turn.

An answer's probability is the sum over its spellings as written and capitalised ("yes" + "Yes"):
chat models answer "Yes", PaliGemma and BLIP-2 "yes". When every spelling of every choice is one
token (yes/no questions, most TIFA choices), one forward pass of the prompt gives them all (the
next-token distribution); otherwise each spelling is scored after the prompt by teacher forcing.
Forward passes are batched over images and questions (``batch_size`` sequences each), left-padded
so that every answer ends at the same position and logits are computed only where answers are read.

Models load once per process and (model, device, dtype): every scorer built with the same model
shares it (``load_vlm``). Weights load from safetensors only.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from selma_toolkit.errors import ModelError
from selma_toolkit.evaluate.scorers import load_pretrained
from selma_toolkit.models import default_device

if TYPE_CHECKING:
    from PIL.Image import Image

QUESTION_ANSWER_PROMPTS = {
    "blip-2": "Question: {question} Answer:",
    "instructblip": "Question: {question} Short answer:",
}
PALIGEMMA_PROMPT = "<image>answer en {question}"


@dataclass(frozen=True)
class Ask:
    """One question about one image, with its candidate answers."""

    image: Image
    question: str
    choices: tuple[str, ...]


def spellings(choice: str) -> tuple[str, ...]:
    """The spellings of an answer whose probabilities add up: as written, and capitalised."""
    return tuple(dict.fromkeys((choice, choice[:1].upper() + choice[1:])))


def resolve_dtype(dtype: str, device: str) -> Any:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; otherwise the torch dtype of that name."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


@functools.lru_cache(maxsize=2)
def load_vlm(model_id: str, device: str, dtype: str) -> tuple[Any, Any]:
    """The model and processor of ``model_id`` on ``device``, loaded once per process and settings
    (the two most recent are kept), so every scorer and judge with this model shares one copy."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = load_pretrained(
        AutoModelForImageTextToText, model_id, "vqa_model", dtype=resolve_dtype(dtype, device), device_map=device
    )
    processor = load_pretrained(AutoProcessor, model_id, "vqa_model", weights=False)
    return model.eval(), processor


class VlmAnswerer:
    """Log-likelihoods of candidate answers under an image-text-to-text model, batched."""

    yes_no_normalised = False  # VQAScore is P(yes) itself, as its authors read it from these models

    def __init__(self, model_id: str, device: str | None = None, dtype: str = "auto", batch_size: int = 16):
        self.model_id, self.device, self.dtype, self.batch_size = model_id, device, dtype, batch_size
        self.model: Any = None
        self.processor: Any = None

    @classmethod
    def from_loaded(cls, model: Any, processor: Any, name: str, batch_size: int = 16) -> VlmAnswerer:
        """An answerer over a model and processor already in memory (e.g. built from a config with
        random weights to measure speed: bench/gpu.py)."""
        answerer = cls(name, str(model.device), str(model.dtype).removeprefix("torch."), batch_size)
        answerer.model, answerer.processor = model, processor
        answerer._configure()
        return answerer

    def _ensure_loaded(self) -> None:
        if self.model is not None:
            return
        self.device = self.device or default_device()
        self.model, self.processor = load_vlm(self.model_id, self.device, self.dtype)
        self._configure()

    def _configure(self) -> None:
        """The prompt form, padding side and logits of the loaded model."""
        config = self.model.config
        self.model_type = config.model_type
        self.encoder_decoder = bool(getattr(getattr(config, "text_config", config), "is_encoder_decoder", False))
        template = getattr(self.processor, "chat_template", None)
        if self.model_type not in QUESTION_ANSWER_PROMPTS and self.model_type != "paligemma" and not template:
            raise ModelError(
                what=f"{self.model_id} ({self.model_type}) has no chat template and no known VQA prompt, so there is "
                "no way to ask it a question",
                where="vqa_model",
                found=self.model_id,
                expected="a BLIP VQA, BLIP-2, InstructBLIP or PaliGemma model, or an image-text-to-text model whose "
                "processor has a chat template (LLaVA, Qwen2.5-VL, ...)",
            )
        # A decoder-only model reads left-padded rows: every answer ends at the last position, so logits
        # are computed only for the last few positions, and rotary or mask-counted positions make a padded
        # row score as it does alone. An encoder-decoder reads right-padded prompts: BLIP-2's processor
        # puts the image tokens before the padding, and a pad between them and the text would move
        # T5's relative positions.
        self.processor.tokenizer.padding_side = "right" if self.encoder_decoder else "left"
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        tokenizer = self.processor.tokenizer
        # Tokens the tokenizer appends after any text (an end-of-sequence token, or none).
        self.trail = (
            len(tokenizer("a")["input_ids"])
            - len(tokenizer("a", add_special_tokens=False)["input_ids"])
            - _leading_specials(tokenizer)
        )

    # ----------------------------------------------------------------------------- prompt and answer

    def prompt(self, question: str) -> str:
        """The text the model reads before its answer."""
        if self.model_type in QUESTION_ANSWER_PROMPTS:
            return QUESTION_ANSWER_PROMPTS[self.model_type].format(question=question)
        if self.model_type == "paligemma":
            return PALIGEMMA_PROMPT.format(question=question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer_text(self, prompt: str, spelling: str) -> str:
        """The answer as it follows the prompt: after a space where the prompt ends in a word or ':'."""
        if self.encoder_decoder or self.model_type == "paligemma" or prompt[-1:].isspace():
            return spelling
        return " " + spelling

    def answer_ids(self, prompt: str, spelling: str) -> list[int]:
        """The token ids the answer adds after the prompt."""
        tokenizer = self.processor.tokenizer
        text = self.answer_text(prompt, spelling)
        if self.encoder_decoder or self.model_type == "paligemma":
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        # Tokenised together, as the model reads it: a tokenizer may join the answer's first characters
        # with the prompt's last ones differently than it tokenises the answer alone.
        before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        after = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
        if after[: len(before)] != before:
            raise ModelError(
                f"vqa_model = {self.model_id!r}: the answer {spelling!r} changes how the prompt's last "
                "tokens are split; this tokenizer cannot be scored by answer likelihood"
            )
        return after[len(before) :]

    # ------------------------------------------------------------------------------- the scoring

    def answer_logprobs(self, asks: Sequence[Ask]) -> list[list[float]]:
        """For each ask, the log-probability of each of its choices (spellings added)."""
        self._ensure_loaded()
        prompts = [self.prompt(ask.question) for ask in asks]
        ids = [
            [[self.answer_ids(prompt, s) for s in spellings(c)] for c in ask.choices]
            for ask, prompt in zip(asks, prompts, strict=True)
        ]
        one_step = [all(len(x) == 1 for choice in row for x in choice) for row in ids]
        # Next-token distributions of the asks whose answers are all one token.
        nexts = [i for i, single in enumerate(one_step) if single]
        next_logprobs: dict[int, Any] = {}
        for start in range(0, len(nexts), self.batch_size):
            chunk = nexts[start : start + self.batch_size]
            rows = self._next_token_logprobs([asks[i].image for i in chunk], [prompts[i] for i in chunk])
            next_logprobs.update(zip(chunk, rows, strict=True))
        # Teacher-forced answers of the others: one row per spelling.
        spelled = [
            (i, c, s)
            for i, single in enumerate(one_step)
            if not single
            for c in range(len(ids[i]))
            for s in range(len(ids[i][c]))
        ]
        seq_logprobs: dict[tuple[int, int, int], float] = {}
        for start in range(0, len(spelled), self.batch_size):
            chunk = spelled[start : start + self.batch_size]
            values = self._answer_logprobs(
                [asks[i].image for i, _, _ in chunk],
                [prompts[i] for i, _, _ in chunk],
                [self.answer_text(prompts[i], spellings(asks[i].choices[c])[s]) for i, c, s in chunk],
                [ids[i][c][s] for i, c, s in chunk],
            )
            seq_logprobs.update(zip(chunk, values, strict=True))
        results = []
        for i, row in enumerate(ids):
            if one_step[i]:
                parts = [[float(next_logprobs[i][x[0]]) for x in choice] for choice in row]
            else:
                parts = [[seq_logprobs[(i, c, s)] for s in range(len(choice))] for c, choice in enumerate(row)]
            results.append([_logsumexp(values) for values in parts])
        return results

    def _inputs(self, images: Sequence[Image], texts: Sequence[str], **extra: Any):
        batch = self.processor(
            images=[image.convert("RGB") for image in images],
            text=list(texts),
            padding=True,
            return_tensors="pt",
            **extra,
        )
        batch.pop("labels", None)  # PaliGemma's processor adds training labels; the answers are read here
        return batch.to(self.model.device, dtype=self.model.dtype)

    def _forward(self, batch: Any, keep: int, **extra: Any):
        """Float32 logits of the last ``keep`` positions (all positions where the model cannot limit them)."""
        import torch

        if self.keeps_logits:
            extra["logits_to_keep"] = keep
        with torch.no_grad():
            logits = self.model(**batch, **extra).logits
        return logits[:, -keep:].float()

    def _next_token_logprobs(self, images: Sequence[Image], prompts: Sequence[str]) -> list[Any]:
        """Log-softmax of the token after each prompt, [vocab] per row."""
        import torch

        batch = self._inputs(images, prompts)
        if self.encoder_decoder:
            start = self.model.config.text_config.decoder_start_token_id
            decoder = torch.full((len(prompts), 1), start, dtype=torch.long, device=self.model.device)
            logits = self._forward(batch, 1, decoder_input_ids=decoder)[:, 0]
        else:
            # The last real token predicts the answer's first one (before any appended end token).
            logits = self._forward(batch, 1 + self.trail)[:, 0]
        return list(torch.log_softmax(logits, dim=-1).cpu())

    def _answer_logprobs(self, images, prompts, answers, answer_ids) -> list[float]:
        """log P(answer tokens | image, prompt) by teacher forcing, one row per answer."""
        import torch

        longest = max(len(x) for x in answer_ids)
        if self.encoder_decoder:
            labels = torch.full((len(answers), longest), -100, dtype=torch.long)
            for row, x in enumerate(answer_ids):
                labels[row, : len(x)] = torch.tensor(x)
            logits = self._forward(self._inputs(images, prompts), longest, labels=labels.to(self.model.device))
            targets, logits = labels, logits[:, :longest]
        else:
            if self.model_type == "paligemma":
                batch, trail = self._inputs(images, prompts, suffix=list(answers)), 1  # the suffix ends in <eos>
            else:
                batch, trail = self._inputs(images, [p + a for p, a in zip(prompts, answers, strict=True)]), self.trail
            # Left padding: every row's answer ends ``trail`` tokens before the last position. Keeping the
            # last longest + trail + 1 positions, slot k < longest predicts the token ``longest - k`` places
            # before the answer's end, so a row's n answer tokens are the targets of its last n slots.
            logits = self._forward(batch, longest + trail + 1)[:, :longest]
            targets = torch.full((len(answers), longest), -100, dtype=torch.long)
            input_ids = batch["input_ids"].cpu()
            end = input_ids.shape[1] - trail
            for row, x in enumerate(answer_ids):
                read = input_ids[row, end - len(x) : end].tolist()
                if read != list(x):
                    raise ModelError(
                        f"vqa_model = {self.model_id!r}: the processor tokenised the answer "
                        f"{answers[row]!r} as {read}, not as {list(x)}; it cannot be scored by likelihood"
                    )
                targets[row, longest - len(x) :] = torch.tensor(x)
        logprobs = torch.log_softmax(logits, dim=-1)
        gathered = logprobs.gather(-1, targets.clamp(min=0).to(logprobs.device)[..., None]).squeeze(-1)
        return (gathered * (targets >= 0).to(gathered.device)).sum(dim=-1).cpu().tolist()


def _leading_specials(tokenizer: Any) -> int:
    """Tokens a tokenizer puts before any text (a beginning-of-sequence token, or none)."""
    with_specials = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    return next((i for i in range(len(with_specials)) if with_specials[i : i + len(bare)] == bare), 0)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))
