"""The shapes world: its vocabulary and the structured captions that describe a scene.

A caption names one to four objects by count, colour and shape, optionally joined by "and" or
by one spatial relation::

    three purple triangles
    two red circles and a white square
    a green diamond and a blue circle
    a yellow square to the left of a red triangle

Grammar (words are lower case, separated by spaces; a trailing full stop is ignored)::

    caption  := phrase ("and" phrase)*  |  phrase relation phrase
    phrase   := ("a" | "an" | "one" | "two" | "three" | "four") [colour] shape["s"]
    relation := "to the left of" | "to the right of" | "above" | "below"

The skill recipes (recipes/skills/toy-*.toml) write such captions with the offline grammar
source; :func:`parse_caption` reads them back for the renderer and the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass

# Pure, well separated colours on a near-black background, so that segmentation by the nearest
# palette colour stays right on blurry generated images.
BACKGROUND: tuple[int, int, int] = (16, 16, 16)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 40),
    "purple": (155, 60, 200),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
NUMBERS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
RELATIONS: dict[str, str] = {
    "to the left of": "left",
    "to the right of": "right",
    "above": "above",
    "below": "below",
}
MAX_OBJECTS = 4
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Group:
    """``count`` objects of one ``shape``, all of ``color`` (None: the caption leaves it open)."""

    count: int
    shape: str
    color: str | None = None

    def phrase(self) -> str:
        """How a question names one object of the group: "red circle", "circle"."""
        return f"{self.color} {self.shape}" if self.color else self.shape


@dataclass(frozen=True)
class Scene:
    """What a caption says: object groups and, for two single objects, a relation of the first to
    the second ("left": groups[0] is to the left of groups[1])."""

    groups: tuple[Group, ...]
    relation: str | None = None

    @property
    def num_objects(self) -> int:
        return sum(group.count for group in self.groups)


class CaptionError(ValueError):
    """A caption outside the shapes-world grammar."""


def _plural_to_shape(word: str) -> tuple[str, bool] | None:
    """("circle", plural?) for "circle" / "circles", or None."""
    if word in SHAPES:
        return word, False
    if word.endswith("s") and word[:-1] in SHAPES:
        return word[:-1], True
    return None


def _parse_phrase(words: list[str], caption: str) -> Group:
    if not words or words[0] not in NUMBERS:
        raise CaptionError(
            f"{caption!r}: a phrase must start with a, an, one, two, three or four, found {' '.join(words)!r}"
        )
    count = NUMBERS[words[0]]
    rest = words[1:]
    color = None
    if len(rest) == 2 and rest[0] in COLORS:
        color, rest = rest[0], rest[1:]
    shape = _plural_to_shape(rest[0]) if len(rest) == 1 else None
    if shape is None:
        raise CaptionError(
            f"{caption!r}: expected [colour] shape after {words[0]!r}, found {' '.join(rest)!r} "
            f"(colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)})"
        )
    name, plural = shape
    if plural != (count > 1):
        raise CaptionError(f"{caption!r}: {' '.join(words)!r}: the number and the noun disagree")
    return Group(count=count, shape=name, color=color)


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; :class:`CaptionError` for text outside the grammar."""
    text = " ".join(caption.lower().strip().rstrip(".").replace(",", " ").split())
    for words, relation in RELATIONS.items():
        left, sep, right = text.partition(f" {words} ")
        if sep:
            scene = Scene(
                groups=(_parse_phrase(left.split(), caption), _parse_phrase(right.split(), caption)), relation=relation
            )
            if any(group.count != 1 for group in scene.groups):
                raise CaptionError(f"{caption!r}: a relation joins two single objects")
            break
    else:
        scene = Scene(groups=tuple(_parse_phrase(part.split(), caption) for part in text.split(" and ")))
    if scene.num_objects > MAX_OBJECTS:
        raise CaptionError(
            f"{caption!r}: {scene.num_objects} objects; the {IMAGE_SIZE}x{IMAGE_SIZE} world holds at most {MAX_OBJECTS}"
        )
    return scene


def try_parse_caption(caption: str) -> Scene | None:
    """:func:`parse_caption`, or None for a caption outside the grammar."""
    try:
        return parse_caption(caption)
    except CaptionError:
        return None
