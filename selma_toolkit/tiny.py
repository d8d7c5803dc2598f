"""The embedded default: tiny, randomly initialised text-to-image models, built from configs.

Same architecture classes as the real models (UNet2DConditionModel, AutoencoderKL, CLIP text
encoders, CLIP tokenizer, the real schedulers), so every stage runs on them unchanged, on a CPU,
with no download. Their images mean nothing; their code paths are the real ones.

The configs live in each family's record (``selma_toolkit.architectures``, ``Family.tiny``):

* ``sd1``: SD 1.x layout (one CLIPTextModel, epsilon prediction, PNDM scheduler as SD 1.4/1.5).
* ``sd2``: SD 2.x layout (linear projections, per-block head dims, v-prediction as SD 2 768-v).
* ``sdxl``: SDXL layout (two text encoders, pooled embeddings, ``text_time`` added conditions).
* ``sd3``: SD 3 layout (SD3Transformer2DModel, CLIP-L/G with projection + a small T5EncoderModel,
  flow matching with FlowMatchEulerDiscreteScheduler).
* ``flux``: Flux layout (FluxTransformer2DModel with double- and single-stream blocks and the guidance
  embedding as FLUX.1-dev, CLIP-L pooled + a small T5EncoderModel, flow matching with dynamic shift).

The T5 tokenizer is built in memory too (a Unigram ``T5Tokenizer`` over the same word list).

The same call writes the same weights: every component is built right after ``torch.manual_seed``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from selma_toolkit.architectures import FAMILY_NAMES, get_family
from selma_toolkit.config.registries import import_object

ARCHITECTURES: tuple[str, ...] = FAMILY_NAMES  # every family has a tiny config in its record
TINY_PREFIX = "tiny:"
# Bump when a config below changes, so cached copies are rebuilt.
TINY_VERSION = 1

# Words the tiny tokenizer keeps whole (one token each); anything else falls back to characters.
_WORDS = """a an the of and with on in at to from by for under over above below behind next near left
right top bottom front back inside outside beside between one two three four five six seven eight
nine ten red green blue yellow orange purple pink black white brown gray grey silver gold small big
large tiny huge tall short long round square circle triangle star heart cube ball box cup dog cat bird
horse cow sheep car bus bike bicycle train boat plane apple banana orange pizza cake table chair bed
sofa tree flower house street city man woman boy girl child people person photo image picture
painting drawing is are sitting standing riding holding walking running lying made wooden glass
metal stone plastic shapes shape object objects color""".split()


def _learn_merges(words: list[str], end_of_word: str = "</w>") -> list[tuple[str, str]]:
    """Byte-pair merges learnt from ``words`` until each word is one token (``end_of_word`` marks a
    word's last symbol, as CLIP's BPE does; ``""`` for tokenizers that mark word starts instead).

    Written here rather than with the `tokenizers` BpeTrainer because that trainer breaks ties
    between equally frequent pairs in hash order, so two runs give different vocabularies; tiny
    models must be byte-identical for the same seed. Ties here go to the smallest pair.
    """
    from collections import Counter

    corpus = [tuple(word[:-1]) + (word[-1] + end_of_word,) for word in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for word in corpus for pair in zip(word, word[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged_corpus = []
        for word in corpus:
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged_corpus.append(tuple(out))
        corpus = merged_corpus


def tiny_tokenizer():
    """A CLIP tokenizer built in memory: CLIP's 256 byte-level symbols plus BPE merges learnt from
    a small word list, so common prompt words are single tokens. Offline: the real CLIP
    vocabulary is not on this machine."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    merges = _learn_merges(_WORDS)
    # CLIP's vocabulary holds every symbol both alone and word-final ("a", "a</w>"), then the merges.
    vocab_list = list(dict.fromkeys(alphabet + [s + "</w>" for s in alphabet] + [a + b for a, b in merges]))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")


def tiny_t5_tokenizer(max_length: int = 512, extra_words: tuple[str, ...] = (), characters: str = ""):
    """A T5 tokenizer built in memory: a Unigram model over the tiny word list (each a whole piece
    after T5's "▁" word marker) and single characters, T5's specials first (pad 0, eos 1, unk 2).
    ``max_length``: the family's T5 prompt length (the pipelines pad to it); ``extra_words`` and
    ``characters``: more whole words and single characters (the VQA judges' prompt words)."""
    from transformers import T5Tokenizer

    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()" + characters
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + word, -2.0) for word in dict.fromkeys(_WORDS + list(extra_words))]
    pieces += [(character, -5.0) for character in dict.fromkeys(characters)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5_encoder(vocab_size: int, config):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                   **dict(config)))


def _text_encoder_config(vocab_size: int, hidden: int, projection_dim: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _vae(**overrides: Any):
    from diffusers import AutoencoderKL

    # Two blocks: the VAE downsamples by 2 (a real one by 8); the pipelines read the factor from it.
    # ``overrides``: the family's TinyConfig.vae (none for SD 1.x / 2.x / XL).
    return AutoencoderKL(**{
        "block_out_channels": (32, 64),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": 64,
        **overrides,
    })


def build_tiny_pipeline(arch: str = "sd1", seed: int = 0):
    """Build a tiny random pipeline of the given family (in memory), from its record's
    :class:`~selma_toolkit.architectures.TinyConfig`: denoiser, scheduler, one small CLIP text
    encoder (32 wide) per CLIP of the family and a small T5 (``TinyConfig.t5``) per T5, and the
    shared tiny VAE (with the family's ``TinyConfig.vae`` settings)."""
    import diffusers
    import torch
    import transformers

    try:
        family = get_family(arch)
    except ValueError as exc:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}") from exc
    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    denoiser = getattr(diffusers, family.denoiser_class)(**family.tiny.denoiser)
    scheduler = getattr(diffusers, family.tiny.scheduler_class)(**family.tiny.scheduler)
    torch.manual_seed(seed + 1)
    vae = _vae(**family.tiny.vae)
    parts: dict[str, Any] = {family.denoiser: denoiser, "vae": vae, "scheduler": scheduler}
    for index, (spec, act) in enumerate(zip(family.text_encoders, family.tiny.text_activations)):
        torch.manual_seed(seed + 2 + index)
        if spec.kind == "t5":
            parts[spec.tokenizer] = tiny_t5_tokenizer(spec.max_length)
            parts[spec.component] = _t5_encoder(len(parts[spec.tokenizer]), family.tiny.t5)
            continue
        model_class = getattr(transformers, spec.model_class)
        parts[spec.component] = model_class(_text_encoder_config(vocab_size, 32, 32, act))
        parts[spec.tokenizer] = tokenizer if index == 0 else tiny_tokenizer()
    pipeline_class = getattr(diffusers, family.pipeline_class)
    if "safety_checker" in inspect.signature(pipeline_class.__init__).parameters:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipeline_class(**parts)


def create_tiny_model(out: str | os.PathLike[str], arch: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny model in the standard diffusers folder layout (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/; SDXL adds text_encoder_2/ and tokenizer_2/; SD 3 and
    Flux have transformer/ instead of unet/, and a T5 in text_encoder_3/ or text_encoder_2/).

    The folder appears whole or not at all (built in a temporary folder, then renamed).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    pipe = build_tiny_pipeline(arch, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "selma_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "version": TINY_VERSION}))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cache_dir() -> Path:
    """Where built tiny models are kept: $SELMA_CACHE or ~/.cache/selma."""
    return Path(os.environ.get("SELMA_CACHE", Path.home() / ".cache" / "selma"))


def is_tiny_spec(spec: str) -> bool:
    return spec.startswith(TINY_PREFIX)


def ensure_tiny_model(spec: str) -> Path:
    """Path of the tiny model named by ``"tiny:<arch>"`` (optionally ``"tiny:<arch>:<seed>"``),
    built into the cache on first use."""
    parts = spec[len(TINY_PREFIX):].split(":")
    arch = parts[0]
    if arch not in ARCHITECTURES or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"{spec!r}: expected tiny:<arch>[:<seed>] with arch one of {', '.join(ARCHITECTURES)}")
    seed = int(parts[1]) if len(parts) == 2 else 0
    path = cache_dir() / "tiny" / f"{arch}-seed{seed}-v{TINY_VERSION}"
    if not (path / "model_index.json").is_file():
        try:
            create_tiny_model(path, arch, seed)  # type: ignore[arg-type]
        except OSError:
            # Another process finished the same build first: its copy is identical.
            if not (path / "model_index.json").is_file():
                raise
    return path


# --------------------------------------------------------------------------------------------
# Tiny scorer models (evaluation): a CLIP model and a BLIP VQA model, random, built from configs
# --------------------------------------------------------------------------------------------

# The tiny VQA judges (image-text-to-text models) of selma_toolkit.tiny_vlm, loaded on use as the
# registries are (config/registries.py), since that module builds on this one.
TINY_VLMS: dict[str, str] = {
    "blip2": "selma_toolkit.tiny_vlm:build_tiny_blip2",
    "paligemma": "selma_toolkit.tiny_vlm:build_tiny_paligemma",
    "llava": "selma_toolkit.tiny_vlm:build_tiny_llava",
    "qwen2.5-vl": "selma_toolkit.tiny_vlm:build_tiny_qwen25_vl",
}
SCORER_MODELS: tuple[str, ...] = ("clip", "vqa", *TINY_VLMS)
_SCORER_IMAGE_SIZE = 32


def tiny_wordpiece_tokenizer():
    """A BERT WordPiece tokenizer built in memory from the tiny word list (BLIP's text side is BERT,
    so it needs WordPiece rather than CLIP's BPE). ``[DEC]`` is BLIP's decoder start token."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()")
    words = specials + ["yes", "no", "there", "does", "this", "show"] + _WORDS + characters
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(words))}
    return BertTokenizer(vocab=vocab)


def build_tiny_clip(seed: int = 0):
    """A tiny random ``CLIPModel`` (32 px images) and its ``CLIPProcessor`` (tiny CLIP tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)
    text = _text_encoder_config(vocab_size, 32, 16, "quick_gelu").to_dict()
    vision = dict(image_size=_SCORER_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    # The PIL image processor: the default one needs torchvision, which this project does not install.
    size = _SCORER_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_vqa(seed: int = 0):
    """A tiny random ``BlipForQuestionAnswering`` (32 px images) and its ``BlipProcessor``."""
    import torch
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = tiny_wordpiece_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"))
    vision = dict(image_size=_SCORER_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    size = _SCORER_IMAGE_SIZE
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def ensure_tiny_scorer_model(spec: str) -> Path:
    """Folder of the tiny scorer model named ``"tiny:clip"``, ``"tiny:vqa"`` or a tiny VQA judge
    (``TINY_VLMS``), written on first use with ``save_pretrained`` (model + processor), so scorers
    load it like any Hub model."""
    kind = spec[len(TINY_PREFIX):] if is_tiny_spec(spec) else ""
    if kind not in SCORER_MODELS:
        raise ValueError(f"{spec!r}: expected one of {', '.join(TINY_PREFIX + k for k in SCORER_MODELS)}")
    path = cache_dir() / "tiny" / f"{kind}-seed0-v{TINY_VERSION}"
    if not (path / "config.json").is_file():
        build = {"clip": build_tiny_clip, "vqa": build_tiny_vqa}.get(kind) or import_object(TINY_VLMS[kind])
        model, processor = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            os.replace(tmp, path)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            # OSError from the rename: another process finished the same build first (identical copy).
            if not (isinstance(exc, OSError) and (path / "config.json").is_file()):
                raise
    return path
