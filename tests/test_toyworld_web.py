"""Web-like pretraining captions (toy:shapes-web): every caption is true of its image except the
documented wrong share, read back here by an independent reader of the words."""

from __future__ import annotations

import random
import re

import pytest

from selma_toolkit.toyworld.renderer import place_objects
from selma_toolkit.toyworld.web_captions import P_WRONG, web_caption
from selma_toolkit.toyworld.world import parse_caption

# The reader's own vocabulary (written from the module docstring, not imported from it).
NOUNS = {
    "circle": "circle",
    "circles": "circle",
    "disc": "circle",
    "discs": "circle",
    "square": "square",
    "squares": "square",
    "box": "square",
    "boxes": "square",
    "triangle": "triangle",
    "triangles": "triangle",
    "diamond": "diamond",
    "diamonds": "diamond",
    "rhombus": "diamond",
    "rhombuses": "diamond",
}
PLURAL = {"circles", "discs", "squares", "boxes", "triangles", "diamonds", "rhombuses"}
COLOURS = {
    "red": "red",
    "green": "green",
    "blue": "blue",
    "yellow": "yellow",
    "purple": "purple",
    "white": "white",
    "violet": "purple",
}
NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
FILLERS = ("a picture of ", "photo of ", "an image of ")
ENDINGS = (" on black", " clipart", " simple shapes")
RELATIONS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


def read_phrase(text: str) -> tuple[str, str | None, int | None]:
    """(shape, colour or None, count or None for a bare plural)."""
    words = text.split()
    count = None
    if words[0] in NUMBERS:
        count = NUMBERS[words.pop(0)]
    elif words[0] == "some":
        words.pop(0)
    colour = COLOURS[words.pop(0)] if len(words) == 2 else None
    (noun,) = words
    assert (noun in PLURAL) == (count is None or count > 1), text
    return NOUNS[noun], colour, count


def is_true(caption: str, objects, relation: str | None) -> bool:
    for filler in FILLERS:
        if caption.startswith(filler):
            caption = caption[len(filler) :]
    for ending in ENDINGS:
        if caption.endswith(ending):
            caption = caption[: -len(ending)]
    stated = None
    for words, name in RELATIONS.items():
        if f" {words} " in caption:
            first, second = caption.split(f" {words} ")
            stated, parts = name, [first, second]
            break
    else:
        parts = caption.split(" and ")
    phrases = [read_phrase(part) for part in parts]
    for shape, colour, count in phrases:
        matching = [o for o in objects if o.shape == shape and (colour is None or o.color == colour)]
        if (count is None and len(matching) < 2) or (count is not None and len(matching) != count):
            return False
    if stated is not None:
        # Only single objects are related: the two objects of a relation scene.
        (a_shape, a_colour, _), (b_shape, b_colour, _) = phrases
        first = next(o for o in objects if o.shape == a_shape and (a_colour is None or o.color == a_colour))
        second = next(
            o for o in objects if o is not first and o.shape == b_shape and (b_colour is None or o.color == b_colour)
        )
        (x1, y1), (x2, y2) = first.center, second.center
        dx, dy = x2 - x1, y2 - y1
        along = {"left": dx, "right": -dx, "above": dy, "below": -dy}[stated]
        across = abs(dy) if stated in ("left", "right") else abs(dx)
        if not (along > 1 and along > across):
            return False
    return True


def captions_of_the_pretraining_stream(n: int):
    from selma_toolkit.toyworld.pretrain import batch_captions, caption_sources

    grammars = caption_sources()
    out = []
    for step in range(n // 50):
        captions, rng = batch_captions(grammars, 0, "unet", step, 50)
        web_rng = random.Random(f"web-test:{step}")
        for caption in captions:
            scene = parse_caption(caption)
            objects = place_objects(scene, rng)
            out.append((caption, objects, scene.relation, web_caption(objects, scene.relation, web_rng)))
    return out


def test_every_web_caption_is_true_of_its_image_except_the_documented_wrong_share():
    stream = captions_of_the_pretraining_stream(3000)
    wrong = [c for *_, c in stream if c.wrong]
    for explicit, objects, relation, caption in stream:
        if not caption.wrong:
            assert is_true(caption.text, objects, relation), (explicit, caption.text)
    # The wrong share is the documented 5% (binomial 99.9% band for 3,000 draws) and those are false.
    assert abs(len(wrong) / len(stream) - P_WRONG) < 3.3 * (P_WRONG * (1 - P_WRONG) / len(stream)) ** 0.5
    false = [c for explicit, objects, relation, c in stream if c.wrong and not is_true(c.text, objects, relation)]
    assert len(false) >= 0.95 * len(wrong)


def test_web_captions_are_partial_noisy_and_fit_the_text_encoder():
    from selma_toolkit.toyworld.model import MAX_TOKENS, toy_tokenizer

    stream = captions_of_the_pretraining_stream(2000)
    texts = [c.text for *_, c in stream]
    explicit = [e for e, *_ in stream]
    tokenizer = toy_tokenizer("web")
    lengths = [len(tokenizer(t).input_ids) for t in texts]
    assert max(lengths) <= MAX_TOKENS
    # Every web word is one token: no caption falls back to characters.
    assert all(n == len(t.split()) + 2 for n, t in zip(lengths, texts))
    share = lambda predicate: sum(map(predicate, texts)) / len(texts)  # noqa: E731
    # Counts are mostly omitted (explicit prompts state them always), relations rarely stated,
    # synonyms and fillers present, and the caption differs from the explicit prompt most of the time.
    counted = sum(bool(re.search(r"\b(two|three|four)\b", t)) for t in texts)
    counted_explicit = sum(bool(re.search(r"\b(two|three|four)\b", e)) for e in explicit)
    assert counted < 0.5 * counted_explicit
    related = sum(any(w in t for w in RELATIONS) for t in texts)
    related_explicit = sum(any(w in e for w in RELATIONS) for e in explicit)
    assert 0.1 * related_explicit < related < 0.45 * related_explicit
    assert (
        share(
            lambda t: any(w in t.split() for w in ("disc", "discs", "box", "boxes", "rhombus", "rhombuses", "violet"))
        )
        > 0.03
    )
    assert share(lambda t: t.startswith(FILLERS)) > 0.1
    assert sum(t != e for t, e in zip(texts, explicit)) / len(texts) > 0.6


def test_web_pretraining_renders_the_explicit_stream_and_reads_web_captions(tmp_path):
    """--captions web changes what the text encoder reads, never the renders (so both bases see
    the same pictures), and the explicit stream stays what toy:shapes was trained on."""
    import torch

    from selma_toolkit.toyworld.pretrain import (
        PretrainSettings,
        batch_captions,
        caption_sources,
        draw_batch,
        render_batch,
        training_texts,
    )

    grammars = caption_sources()
    captions, rng = batch_captions(grammars, 0, "unet", 7, 16)
    captions_again, rng_again = batch_captions(grammars, 0, "unet", 7, 16)
    pixels, drawn = draw_batch(captions, rng)
    assert torch.equal(pixels, render_batch(captions_again, rng_again))  # same generator use as before
    explicit = training_texts(captions, drawn, PretrainSettings(), 7)
    web = training_texts(captions, drawn, PretrainSettings(captions="web"), 7)
    assert explicit == captions
    assert web != captions and web == training_texts(captions, drawn, PretrainSettings(captions="web"), 7)


def test_unknown_caption_kind_is_a_clear_error():
    from selma_toolkit.errors import RecipeError
    from selma_toolkit.toyworld.pretrain import PretrainSettings

    with pytest.raises(RecipeError, match="captions = 'alt'.*'explicit' or 'web'"):
        PretrainSettings(captions="alt")
