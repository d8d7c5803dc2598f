"""The tiny models' tokenizers and text encoders, built in memory (no download).

* CLIP (``tiny_tokenizer``): CLIP's 256 byte-level symbols plus BPE merges learnt from a small word
  list, so common prompt words are single tokens; tiny CLIP text towers (``clip_config``).
* T5 (``tiny_t5_tokenizer``, ``t5_encoder``): a Unigram model over the same words.
* BERT WordPiece (``tiny_wordpiece_tokenizer``): BLIP's text side (the tiny VQA scorer).
* Qwen (``tiny_chat_tokenizer``, ``language_model``): a byte-level BPE ``Qwen2Tokenizer`` with Qwen's
  special tokens and a chat template that writes what Qwen3's does for one user message
  (``enable_thinking=False`` adds the empty think block), and tiny instances of the real classes
  the pipelines use (``Qwen2_5_VLForConditionalGeneration`` for Qwen-Image, ``Qwen3Model`` for
  Z-Image, ``Qwen3ForCausalLM`` for FLUX.2 [klein]). Qwen-Image's pipeline drops the first 34
  tokens of its system prompt; every word of that prompt is one token here, as in Qwen's
  vocabulary, so the prompt is 34 tokens here too.

Same words, same merges, same ids on every machine: the tiny models are byte-identical for a seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

# Words the tiny tokenizer keeps whole (one token each); anything else falls back to characters.
_WORDS = """a an the of and with on in at to from by for under over above below behind next near left
right top bottom front back inside outside beside between one two three four five six seven eight
nine ten red green blue yellow orange purple pink black white brown gray grey silver gold small big
large tiny huge tall short long round square circle triangle star heart cube ball box cup dog cat bird
horse cow sheep car bus bike bicycle train boat plane apple banana orange pizza cake table chair bed
sofa tree flower house street city man woman boy girl child people person photo image picture
painting drawing is are sitting standing riding holding walking running lying made wooden glass
metal stone plastic shapes shape object objects color""".split()  # noqa: SIM905 - a word list reads best as text


def _learn_merges(words: list[str], word_end: str = "</w>") -> list[tuple[str, str]]:
    """Byte-pair merges learnt from ``words`` until each word is one token (CLIP marks a word's
    last symbol with ``word_end``; byte-level GPT-2-style vocabularies such as Qwen's mark nothing).

    Written here rather than with the `tokenizers` BpeTrainer because that trainer breaks ties
    between equally frequent pairs in hash order, so two runs give different vocabularies; tiny
    models must be byte-identical for the same seed. Ties here go to the smallest pair.
    """
    corpus = [(*word[:-1], word[-1] + word_end) for word in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for word in corpus for pair in pairwise(word))
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


def t5_encoder(vocab_size: int, config):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **dict(config))
    )


def clip_config(vocab_size: int, hidden: int, projection_dim: int, act: str):
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


def tiny_wordpiece_tokenizer():
    """A BERT WordPiece tokenizer built in memory from the tiny word list (BLIP's text side is BERT,
    so it needs WordPiece rather than CLIP's BPE). ``[DEC]`` is BLIP's decoder start token."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()")
    words = [*specials, "yes", "no", "there", "does", "this", "show", *_WORDS, *characters]
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(words))}
    return BertTokenizer(vocab=vocab)


# Qwen-Image's system prompt (QwenImagePipeline.prompt_template_encode) and the chat markup: each a
# whole token, as in Qwen's vocabulary.
_CHAT_WORDS = """system user assistant Describe describe detailing color shape size texture quantity text spatial
relationships objects background the image by of and""".split()  # noqa: SIM905 - as _WORDS
_CHAT_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# What Qwen3's chat template writes for user messages and the generation prompt; with
# enable_thinking false the assistant turn starts with an empty think block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_chat_tokenizer():
    """A Qwen2 byte-level BPE tokenizer over the tiny words and Qwen-Image's system prompt (each a
    whole token, with and without its leading space), Qwen's special tokens, Qwen3's chat template."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    alphabet = sorted(ByteLevel.alphabet())
    space = "\u0120"  # the byte-level symbol of " "
    words = list(dict.fromkeys(_WORDS + _CHAT_WORDS))
    merges = _learn_merges(words + [space + word for word in words], word_end="")
    vocab_list = list(dict.fromkeys(alphabet + [a + b for a, b in merges])) + list(_CHAT_SPECIALS)
    vocab = {token: index for index, token in enumerate(vocab_list)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in _CHAT_SPECIALS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def language_model(model_class: str, config: Mapping[str, Any], tokenizer):
    """A tiny chat language model of the transformers class ``model_class`` (Qwen2.5-VL or Qwen3)
    from the family's ``TinyConfig.language_model``, its vocabulary and special ids the tokenizer's."""
    import transformers

    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("pad_token_id", "<|endoftext|>"),
            ("bos_token_id", "<|endoftext|>"),
            ("eos_token_id", "<|im_end|>"),
        )
    }
    vocab_size = len(tokenizer)
    if model_class == "Qwen2_5_VLForConditionalGeneration":
        vision = {
            name: tokenizer.convert_tokens_to_ids(token)
            for name, token in (
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
                ("image_token_id", "<|image_pad|>"),
                ("video_token_id", "<|video_pad|>"),
            )
        }
        text = {**config["text_config"], "vocab_size": vocab_size, **ids}
        model_config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(config["vision_config"]), vocab_size=vocab_size, **vision, **ids
        )
    else:
        model_config = transformers.Qwen3Config(
            **dict(config), vocab_size=vocab_size, max_position_embeddings=1024, **ids
        )
    return getattr(transformers, model_class)(model_config).eval()
