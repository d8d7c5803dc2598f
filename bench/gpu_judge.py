"""The VQA judge's part of bench/gpu.py: a real-size PaliGemma-3B built from its published config
with random weights directly on the GPU (bfloat16, no download), answering DSG-style yes/no questions
about generated images through the toolkit's own answerer (selma_toolkit.evaluate.vlm), batched.

PaliGemma-3B (``google/paligemma-3b-mix-448`` / ``-224``): SigLIP-So400m/14 vision tower (27 layers,
width 1152) at 448 px (1024 image tokens) or 224 px (256), a linear projection, and Gemma-2B
(18 layers, width 2048, one key-value head, vocabulary 257216). The tokenizer is the embedded tiny
Gemma one (the real vocabulary is not on this machine); its ids lie inside the real vocabulary, so
the model's cost is the real one for prompts of the same length.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw

JUDGES = {"paligemma-3b-448": 448, "paligemma-3b-224": 224}
QUESTIONS = [
    "is there a dog?",
    "is the dog brown?",
    "is there a red ball?",
    "is the ball left of the dog?",
    "are there two cats?",
    "is the cat sitting?",
    "is there a table?",
    "is the table wooden?",
]


def real_size_judge(name: str, device: str, dtype: Any):
    """PaliGemma-3B at the resolution ``name`` says, random weights created on ``device``."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from selma_toolkit.tiny_vlm import tiny_gemma_tokenizer

    size = JUDGES[name]
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    image_processor.image_seq_length = (size // 14) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tiny_gemma_tokenizer())
    tokenizer = processor.tokenizer
    vision = {
        "image_size": size,
        "patch_size": 14,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "projection_dim": 2048,
    }
    text = {
        "model_type": "gemma",
        "vocab_size": 257216,
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = PaliGemmaConfig(
        vision_config=vision, text_config=text, projection_dim=2048, image_token_index=processor.image_token_id
    )
    with torch.device(device):
        model = PaliGemmaForConditionalGeneration(config)
    return model.to(dtype).eval(), processor


def tiny_judge(name: str, device: str, dtype: Any):
    """--smoke: the embedded tiny PaliGemma."""
    from selma_toolkit.tiny_vlm import build_tiny_paligemma

    model, processor = build_tiny_paligemma()
    return model.to(device=device, dtype=dtype).eval(), processor


def pictures(count: int, size: int) -> list[Image.Image]:
    """Stand-ins for generated images (the judge's cost does not depend on what they show)."""
    rng = random.Random(0)
    out = []
    for _ in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(image).ellipse([size // 4, size // 4, size // 2, size // 2], fill=(200, 30, 30))
        out.append(image)
    return out


def bench_judge(name: str, args, device: str, dtype: Any, timed: Callable[..., float]) -> list[tuple[str, str]]:
    """Table rows: the judge's build time and its speed on ``args.judge_images`` images of
    ``args.judge_questions`` questions each, ``args.judge_batch`` (image, question) pairs per pass."""
    from selma_toolkit.evaluate.vlm import Ask, VlmAnswerer

    start = time.perf_counter()
    model, processor = (tiny_judge if args.smoke else real_size_judge)(name, device, dtype)
    label = f"judge {'tiny:paligemma' if args.smoke else name}"
    rows = [(f"{label}: build on {device}", f"{time.perf_counter() - start:.1f} s")]
    answerer = VlmAnswerer.from_loaded(model, processor, name, batch_size=args.judge_batch)
    questions = (QUESTIONS * (args.judge_questions // len(QUESTIONS) + 1))[: args.judge_questions]
    images = pictures(args.judge_images, 64 if args.smoke else 512)
    asks = [Ask(image, question, ("yes", "no")) for image in images for question in questions]
    seconds = timed(lambda: answerer.answer_logprobs(asks), device, args.repeats, args.warmup)
    rows.append(
        (
            f"{label}: {len(images)} images x {len(questions)} questions, batch {args.judge_batch}",
            f"{len(asks) / seconds:.1f} questions/s ({len(images) / seconds:.2f} images/s)",
        )
    )
    return rows
