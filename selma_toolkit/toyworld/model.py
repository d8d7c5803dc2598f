"""The toy base model: a small Stable-Diffusion-architecture pipeline for the shapes world.

The same classes as SD 1.x (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` and
``CLIPTokenizer``, a diffusers scheduler, ``StableDiffusionPipeline``), so every stage of the
toolkit runs on it unchanged; only the sizes are small enough for a CPU:

* images 32x32 RGB; the VAE downsamples by 2, so the UNet works on 4x16x16 latents;
* UNet (32, 64, 128) channels, cross-attention at 8x8 and 4x4 (about 4 M parameters);
* a 3-layer CLIP text encoder (width 64) over a word-level tokenizer of the shapes-world words,
  captions up to 16 tokens;
* DDPM "linear" betas (1e-4 .. 0.02, 1000 steps), epsilon prediction, sampled with
  DPM-Solver++ (``DPMSolverMultistepScheduler``, trailing timesteps) in 10-20 steps.

The trained weights ship as package data in ``selma_toolkit/toyworld/base/`` (the diffusers folder
layout, fp16 safetensors) and are named ``toy:shapes`` wherever a base model is expected;
``selma toyworld pretrain`` rebuilds them from a seed (selma_toolkit.toyworld.pretrain).
"""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.tiny import _learn_merges
from selma_toolkit.toyworld.web_captions import web_words
from selma_toolkit.toyworld.world import COLORS, IMAGE_SIZE, NUMBERS, RELATIONS, SHAPES

TOY_SPEC = "toy:shapes"
WEB_SPEC = "toy:shapes-web"
BASE_DIR = Path(__file__).resolve().parent / "base"
WEB_BASE_DIR = Path(__file__).resolve().parent / "base-web"
# The shipped toy bases: pretrained on explicit grammar captions / on web-like captions (web_captions.py).
TOY_BASES: dict[str, Path] = {TOY_SPEC: BASE_DIR, WEB_SPEC: WEB_BASE_DIR}
MAX_TOKENS = 16
VAE_SCALE = 2
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE

# The pretraining noise schedule; the shipped scheduler config (DPM-Solver++) uses the same betas.
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
)


def toy_words() -> list[str]:
    """Every word of the shapes-world grammar (singular and plural shapes), one token each."""
    relation_words = [word for phrase in RELATIONS for word in phrase.split()]
    return list(dict.fromkeys([*NUMBERS, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), "and", *relation_words]))


def toy_tokenizer(captions: str = "explicit"):
    """A CLIP tokenizer built in memory: CLIP's byte-level symbols plus BPE merges that make each
    shapes-world word one token (with ``captions="web"`` also the words of web-like captions, for
    ``toy:shapes-web``); other text falls back to characters. Padded to 16 tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # The deterministic merge learner of the tiny models (same tie-breaking, same file every build).

    words = toy_words()
    if captions == "web":
        words = list(dict.fromkeys(words + web_words()))
    alphabet = sorted(ByteLevel.alphabet())
    merges = _learn_merges(words)
    vocab_list = list(dict.fromkeys(alphabet + [s + "</w>" for s in alphabet] + [a + b for a, b in merges]))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=64,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_vae():
    from diffusers import AutoencoderKL

    # Two blocks: one 2x downsampling. No attention in the mid block: shapes are local.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_scheduler():
    """The sampling scheduler saved with the pipeline (training reads the same betas from it)."""
    from diffusers import DPMSolverMultistepScheduler

    # steps_offset does nothing with trailing spacing; 1 keeps the SD pipeline from warning about an "outdated" config.
    return DPMSolverMultistepScheduler(
        **NOISE_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", steps_offset=1
    )


def build_pipeline(unet, vae, text_encoder, tokenizer):
    """A StableDiffusionPipeline from toy parts (no safety checker: the shapes world has no people)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_toy_spec(spec: str) -> bool:
    return spec in TOY_BASES


def toy_base_dir(spec: str = TOY_SPEC) -> Path:
    """The shipped folder of a toy base (``toy:shapes`` or ``toy:shapes-web``); ValueError for
    another ``toy:`` name or when its weights are missing (the ``toy:`` model source of models.py)."""
    if spec not in TOY_BASES:
        raise ValueError(f"{spec}: unknown toy base; the shipped ones are {', '.join(TOY_BASES)}")
    folder = TOY_BASES[spec]
    if (
        not (folder / "model_index.json").is_file()
        or not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    ):
        captions = " --captions web" if spec == WEB_SPEC else ""
        raise ValueError(
            f"{spec}: the toy base model is missing from {folder}; rebuild it with "
            f"`selma toyworld pretrain --out DIR{captions}` and `selma toyworld export DIR --to {folder}`, "
            "or reinstall selma-toolkit"
        )
    return folder
