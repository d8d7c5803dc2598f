"""Web-like captions of shapes-world images: what alt-text is to LAION, for the base `toy:shapes-web`.

Real T2I models are pretrained on captions that describe only part of an image. The skill prompts
(the grammar stage) stay explicit and complete; the *pretraining* captions of ``toy:shapes-web``
are drawn from this documented distribution, given the objects actually drawn (so a colour that
the scene left open is described as rendered):

* **which shapes are named**: the shapes present, in random order; each is named with probability
  ``P_NAME_SHAPE`` (at least one always is). Shapes not named are simply left out.
* **colour**: a named shape gets its colour(s) with probability ``P_COLOR``: then one phrase per
  colour of that shape ("a red circle and two blue circles"); otherwise one phrase for the shape
  ("three circles").
* **count**: a phrase of two or more objects states the number with probability ``P_COUNT``
  ("three red circles"); otherwise it is a bare plural ("red circles", or "some red circles").
  One object is "a"/"an" (English has no count-free singular).
* **relation**: an image drawn for a relation (two single objects placed unambiguously) states it
  with probability ``P_RELATION``, in either direction ("a circle to the left of a square" or
  "a square to the right of a circle"); otherwise the two are joined by "and".
* **other words**: a shape noun is replaced by its synonym (``SYNONYMS``) with probability
  ``P_SYNONYM``, "purple" by "violet" likewise; a filler prefix ("a picture of", "photo of", ...)
  with probability ``P_PREFIX`` and a suffix ("on black", "clipart", ...) with ``P_SUFFIX``.
* **wrong share**: with probability ``P_WRONG`` one phrase is made false: its colour replaced by a
  colour that shape does not have, or its stated count moved by one (a phrase without either
  gets its shape replaced by one not in the image), or a stated relation reversed.

Every other caption is true of its image (tests/test_toyworld_web.py reads captions back
independently and checks them against the drawn objects). Captions fit the toy text encoder's 16
tokens (at most ``MAX_WORDS`` words: fillers are dropped first, then the last phrases).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selma_toolkit.toyworld.renderer import PlacedObject
from selma_toolkit.toyworld.world import COLORS, SHAPES

P_NAME_SHAPE = 0.7
P_COLOR = 0.5
P_COUNT = 0.3
P_RELATION = 0.25
P_SYNONYM = 0.2
P_PREFIX = 0.25
P_SUFFIX = 0.15
P_WRONG = 0.05
MAX_WORDS = 14  # 16 tokens with the start and end tokens, one token per word

SYNONYMS: dict[str, tuple[str, str]] = {
    "circle": ("disc", "discs"),
    "square": ("box", "boxes"),
    "diamond": ("rhombus", "rhombuses"),
}
COLOR_SYNONYMS: dict[str, str] = {"purple": "violet"}
PREFIXES = ("a picture of", "photo of", "an image of")
SUFFIXES = ("on black", "clipart", "simple shapes")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def web_words() -> list[str]:
    """Words web captions use beyond the explicit grammar's (for the tokenizer of ``toy:shapes-web``)."""
    words = [w for pair in SYNONYMS.values() for w in pair] + list(COLOR_SYNONYMS.values()) + ["some"]
    words += [w for phrase in PREFIXES + SUFFIXES for w in phrase.split()]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class Phrase:
    """What one phrase of a web caption claims: ``count`` (None: a bare plural, two or more) objects
    of ``shape``, all of ``color`` (None: any colour, and then the count is of every ``shape``)."""

    shape: str
    color: str | None
    count: int | None

    def words(self, rng: random.Random) -> str:
        plural = self.count is None or self.count > 1
        synonym = rng.random() < P_SYNONYM and self.shape in SYNONYMS
        noun = SYNONYMS[self.shape][1 if plural else 0] if synonym else self.shape + ("s" if plural else "")
        color = self.color
        if color in COLOR_SYNONYMS and rng.random() < P_SYNONYM:
            color = COLOR_SYNONYMS[color]
        if self.count is None:
            number = "some" if rng.random() < 0.3 else ""
        elif self.count == 1:
            number = "an" if not color and noun[0] in "aeiou" else "a"
        else:
            number = COUNT_WORDS[self.count]
        return " ".join(part for part in (number, color, noun) if part)


@dataclass(frozen=True)
class WebCaption:
    """A web-like caption, the claims it makes and whether it was made false on purpose."""

    text: str
    phrases: tuple[Phrase, ...]
    relation: str | None  # between phrases[0] and phrases[1], as stated
    wrong: bool


def _phrases_for(shape: str, objects: list[PlacedObject], rng: random.Random) -> list[Phrase]:
    mine = [o for o in objects if o.shape == shape]
    if rng.random() < P_COLOR:
        colors = sorted({o.color for o in mine})
        rng.shuffle(colors)
        counts = {c: sum(o.color == c for o in mine) for c in colors}
        return [Phrase(shape, c, counts[c] if counts[c] == 1 or rng.random() < P_COUNT else None) for c in colors]
    total = len(mine)
    return [Phrase(shape, None, total if total == 1 or rng.random() < P_COUNT else None)]


def _make_wrong(
    phrases: list[Phrase], relation: str | None, objects: list[PlacedObject], rng: random.Random
) -> tuple[list[Phrase], str | None]:
    """One claim made false (see the module docstring)."""
    if relation is not None and rng.random() < 0.5:
        return phrases, INVERSE[relation]
    index = rng.randrange(len(phrases))
    phrase = phrases[index]
    present_shapes = {o.shape for o in objects}
    if phrase.color is not None:
        colors_of_shape = {o.color for o in objects if o.shape == phrase.shape}
        new = Phrase(phrase.shape, rng.choice(sorted(set(COLORS) - colors_of_shape)), phrase.count)
    elif phrase.count is not None:
        true_count = sum(o.shape == phrase.shape for o in objects)
        options = [n for n in (true_count - 1, true_count + 1) if 1 <= n <= 4]
        new = Phrase(phrase.shape, None, rng.choice(options))
    elif set(SHAPES) - present_shapes:
        new = Phrase(rng.choice(sorted(set(SHAPES) - present_shapes)), None, phrase.count)
    else:  # every shape is in the image: a colour this shape does not have
        colors_of_shape = {o.color for o in objects if o.shape == phrase.shape}
        new = Phrase(phrase.shape, rng.choice(sorted(set(COLORS) - colors_of_shape)), phrase.count)
    return [*phrases[:index], new, *phrases[index + 1 :]], relation


def web_caption(objects: list[PlacedObject], relation: str | None, rng: random.Random) -> WebCaption:
    """A caption of the image of ``objects`` drawn from the distribution of the module docstring.

    ``relation`` is the scene's relation of ``objects[0]`` to ``objects[1]`` (both single, placed
    with a margin by the renderer), or None.
    """
    stated_relation = None
    if relation is not None and len(objects) == 2 and rng.random() < P_RELATION:
        first, second = (0, 1) if rng.random() < 0.5 else (1, 0)
        stated_relation = relation if first == 0 else INVERSE[relation]
        phrases = [
            Phrase(objects[i].shape, objects[i].color if rng.random() < P_COLOR else None, 1) for i in (first, second)
        ]
    else:
        shapes = list(dict.fromkeys(o.shape for o in objects))
        rng.shuffle(shapes)
        named = [s for s in shapes if rng.random() < P_NAME_SHAPE] or [shapes[0]]
        phrases = [p for shape in named for p in _phrases_for(shape, objects, rng)]
    parts = [p.words(rng) for p in phrases]
    prefix = rng.choice(PREFIXES) if rng.random() < P_PREFIX else ""
    suffix = rng.choice(SUFFIXES) if rng.random() < P_SUFFIX else ""

    def text(relation: str | None, parts: list[str], prefix: str, suffix: str) -> str:
        joiner = f" {RELATION_WORDS[relation]} " if relation else " and "
        return " ".join(x for x in (prefix, joiner.join(parts), suffix) if x)

    if len(text(stated_relation, parts, prefix, suffix).split()) > MAX_WORDS:
        prefix = suffix = ""
    while len(text(stated_relation, parts, "", "").split()) > MAX_WORDS and len(parts) > 1:
        parts, phrases = parts[:-1], phrases[:-1]  # only unrelated phrases can be this long
    wrong = rng.random() < P_WRONG
    if wrong:
        changed, stated_relation = _make_wrong(phrases, stated_relation, objects, rng)
        parts = [part if new == old else new.words(rng) for part, new, old in zip(parts, changed, phrases)]
        phrases = changed
    caption = text(stated_relation, parts, prefix, suffix)
    return WebCaption(caption, tuple(phrases), stated_relation, wrong)
