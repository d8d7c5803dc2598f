"""Tiny random vision-language models for the VQA judges, built from configs (no download).

Same classes as the real judges (``AutoModelForImageTextToText`` families with their processors),
32 px images, two layers of width 32, tokenizers built in memory over the tiny word list, so
every code path of :mod:`selma_toolkit.evaluate.vlm` runs on a CPU in seconds:

* ``tiny:blip2``: ``Blip2ForConditionalGeneration`` over Flan-T5 (an encoder-decoder), as
  ``Salesforce/blip2-flan-t5-xl``;
* ``tiny:paligemma``: ``PaliGemmaForConditionalGeneration`` (SigLIP + Gemma, prefix-LM), as
  ``google/paligemma-3b-mix-448``;
* ``tiny:llava``: ``LlavaForConditionalGeneration`` (CLIP vision + Llama) with LLaVA-1.5's chat
  template, as ``llava-hf/llava-1.5-7b-hf``;
* ``tiny:qwen2.5-vl``: ``Qwen2_5_VLForConditionalGeneration`` with a ChatML template, as
  ``Qwen/Qwen2.5-VL-7B-Instruct``.

Every image processor is the PIL one (torchvision is not a dependency). Qwen2.5-VL's processor
also has a video processor, which needs torchvision: ``tiny:qwen2.5-vl`` is built without it
(images only), and a real Qwen2.5-VL checkpoint loads where torchvision is installed
(docs/evaluation.md).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from selma_toolkit.tiny_text import _WORDS, _learn_merges, tiny_t5_tokenizer

IMAGE_SIZE = 32
# Words the judges' prompts use, kept whole by every tiny tokenizer.
_PROMPT_WORDS = [
    "yes",
    "no",
    "Yes",
    "No",
    "does",
    "this",
    "figure",
    "show",
    "please",
    "answer",
    "question",
    "Question",
    "Answer",
    "en",
    "is",
    "there",
    "are",
    "what",
    "how",
    "many",
    "color",
    "USER",
    "ASSISTANT",
    "user",
    "assistant",
    "system",
]
_CHARACTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()<>/|_\n")

# LLaVA-1.5's template (llava-hf/llava-1.5-7b-hf), and a ChatML template of Qwen2.5-VL's form:
# each image becomes <|vision_start|><|image_pad|><|vision_end|>.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _word_pieces(marker: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Symbols and BPE merges for words spelled with a word-start ``marker`` ("▁" for the
    SentencePiece-style Gemma / Llama tokenizers, "Ġ" for Qwen's byte-level one), each word whole."""
    words = list(dict.fromkeys(_WORDS + list(_PROMPT_WORDS)))
    merges = _learn_merges([marker + w for w in words] + words, word_end="")
    symbols = [marker, *_CHARACTERS]
    return list(dict.fromkeys(symbols + [a + b for a, b in merges])), merges


def _sentencepiece_vocab(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary of a byte-fallback BPE (Gemma, Llama): specials, the 256 byte tokens, then pieces."""
    pieces, merges = _word_pieces("\u2581")
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + [p for p in pieces if p not in specials]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def tiny_gemma_tokenizer():
    """A Gemma tokenizer (PaliGemma's) built in memory."""
    from transformers import GemmaTokenizer

    vocab, merges = _sentencepiece_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    return GemmaTokenizer(vocab=vocab, merges=merges)


def tiny_llama_tokenizer():
    """A Llama tokenizer (LLaVA's) built in memory, with LLaVA's ``<image>`` token."""
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_vocab(["<unk>", "<s>", "</s>"])
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tokenizer


def tiny_qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer built in memory, with Qwen2.5-VL's chat and vision tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    pieces, merges = _word_pieces("\u0120")
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(dict.fromkeys(alphabet + pieces))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|im_start|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|image_pad|>",
                "<|video_pad|>",
            ]
        }
    )
    return tokenizer


def _small(**extra: Any) -> dict[str, Any]:
    """Two layers of width 32 with four heads: the tiny size of every part."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **extra)


def build_tiny_blip2(seed: int = 0):
    """A tiny ``Blip2ForConditionalGeneration`` over a Flan-T5 language model and its processor."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = tiny_t5_tokenizer(64, extra_words=_PROMPT_WORDS, characters="ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    queries = 4
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        num_query_tokens=queries,
    )
    vision = _small(image_size=IMAGE_SIZE, patch_size=8)
    qformer = _small(encoder_hidden_size=32, vocab_size=64, max_position_embeddings=64)
    text = dict(
        model_type="t5",
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return Blip2ForConditionalGeneration(config).eval(), processor


def build_tiny_paligemma(seed: int = 0):
    """A tiny ``PaliGemmaForConditionalGeneration`` (SigLIP + Gemma) and its processor."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // 8) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tiny_gemma_tokenizer())
    tokenizer = processor.tokenizer
    vision = _small(image_size=IMAGE_SIZE, patch_size=8, projection_dim=32)
    text = dict(
        model_type="gemma",
        vocab_size=len(tokenizer),
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_small(),
    )
    config = PaliGemmaConfig(
        vision_config=vision, text_config=text, projection_dim=32, image_token_index=processor.image_token_id
    )
    torch.manual_seed(seed)
    return PaliGemmaForConditionalGeneration(config).eval(), processor


def build_tiny_llava(seed: int = 0):
    """A tiny ``LlavaForConditionalGeneration`` (CLIP vision + Llama) and its processor (LLaVA-1.5 template)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_llama_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    vision = dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=8, **_small())
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_small(),
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


def build_tiny_qwen25_vl(seed: int = 0):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` and its processor. The processor holds a video
    processor, which needs torchvision: without it this raises ``ValueError`` saying so."""
    if importlib.util.find_spec("torchvision") is None:
        raise ValueError(
            "tiny:qwen2.5-vl needs torchvision (Qwen2.5-VL's processor includes a video processor "
            "built on it); install a torchvision build that matches your torch"
        )
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = tiny_qwen_tokenizer()
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=32,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    text = dict(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        **_small(),
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor
