"""Builders for evaluation tests: a small scored evaluation folder (real tiny scorers on simple
drawn images) and the open_clip key layout of a CLIP model, written out here from the open_clip
source layout so that the library's mapping is checked against an independent spelling."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

VARIANTS = ("base", "expert:color", "expert:count", "merged:selma")
PROMPTS = {
    "color": ["a red cube", "a blue ball", "a green car"],
    "count": ["two dogs", "three cats"],
}


def drawn_image(seed: int, size: int = 64) -> Image.Image:
    """A small picture: a coloured background with a few coloured shapes (seeded)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size - 16), rng.randrange(size - 16)
        draw.ellipse(
            [x, y, x + rng.randrange(8, 16), y + rng.randrange(8, 16)], fill=tuple(rng.randrange(256) for _ in range(3))
        )
    return image


def variant_items(seed_offset: int = 0):
    """{variant: {skill: [EvalItem]}} with drawn images, one seed per prompt."""
    from selma_toolkit.evaluate import EvalItem

    out = {}
    for v, variant in enumerate(VARIANTS):
        out[variant] = {
            skill: [
                EvalItem(drawn_image(1000 * v + 10 * i + seed_offset), prompt, seed=0, prompt_id=i)
                for i, prompt in enumerate(prompts)
            ]
            for skill, prompts in PROMPTS.items()
        }
    return out


def scored_eval_dir(root: Path) -> Path:
    """An evaluation folder scored with the tiny CLIP (clipscore) and the tiny VQA (vqascore)."""
    from selma_toolkit.evaluate import build_scorers, score_variants
    from selma_toolkit.recipe import EvaluateSettings

    settings = EvaluateSettings(scorers=["clipscore", "vqascore"], clip_model="tiny:clip", vqa_model="tiny:vqa")
    eval_dir = root / "eval"
    score_variants(variant_items(), build_scorers(settings), eval_dir, bootstrap_samples=200)
    return eval_dir


def open_clip_state_dict(model) -> dict:
    """A transformers CLIPModel's weights spelled as open_clip / OpenAI CLIP name them."""
    sd = model.state_dict()
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
    }
    import torch

    for tower, prefix in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        layers = (
            model.config.text_config.num_hidden_layers
            if tower == "text_model"
            else model.config.vision_config.num_hidden_layers
        )
        for n in range(layers):
            hf = f"{tower}.encoder.layers.{n}"
            oc = f"{prefix}.resblocks.{n}"
            for kind in ("weight", "bias"):
                out[f"{oc}.attn.in_proj_{kind}"] = torch.cat([sd[f"{hf}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{oc}.attn.out_proj.{kind}"] = sd[f"{hf}.self_attn.out_proj.{kind}"]
                out[f"{oc}.ln_1.{kind}"] = sd[f"{hf}.layer_norm1.{kind}"]
                out[f"{oc}.ln_2.{kind}"] = sd[f"{hf}.layer_norm2.{kind}"]
                out[f"{oc}.mlp.c_fc.{kind}"] = sd[f"{hf}.mlp.fc1.{kind}"]
                out[f"{oc}.mlp.c_proj.{kind}"] = sd[f"{hf}.mlp.fc2.{kind}"]
    return {k: v.clone() for k, v in out.items()}
