"""Ground-truth images of the shapes world: a caption in, a 32x32 RGB picture that shows exactly it.

Objects are solid shapes 8-11 pixels wide on a near-black background, at least two pixels apart
(so objects of one colour never touch and segmentation can count them). Colours left open by the
caption are drawn at random; a relation "A to the left of B" places B's centre further right than
A's by more than their vertical offset (the test the scorer applies), likewise for the others.
A render is a pure function of the caption and the random generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selma_toolkit.toyworld.world import BACKGROUND, COLORS, IMAGE_SIZE, Scene, parse_caption

MIN_SIZE, MAX_SIZE = 8, 11
GAP = 2
_MAX_TRIES = 2000


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: shape, colour name and its box (left, top, size): pixels x in [left, left+size)."""

    shape: str
    color: str
    left: int
    top: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return self.left + (self.size - 1) / 2.0, self.top + (self.size - 1) / 2.0


def shape_mask(shape: str, width: int, height: int):
    """Boolean mask [height, width] of ``shape`` filling a width x height box: the renderer draws
    with it and the scorer compares segments against it, so the two agree pixel for pixel."""
    import numpy as np

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    # Pixel centres in box coordinates scaled to [-1, 1].
    u = (xs + 0.5) / width * 2.0 - 1.0
    v = (ys + 0.5) / height * 2.0 - 1.0
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return np.abs(u) <= (v + 1.0) / 2.0
    raise ValueError(f"unknown shape {shape!r}")


def _relation_holds(relation: str, first: PlacedObject, second: PlacedObject, margin: float = 3.0) -> bool:
    """The scorer's test (scorer.relation_holds) with a safety margin, so renders are unambiguous."""
    (x1, y1), (x2, y2) = first.center, second.center
    dx, dy = x2 - x1, y2 - y1
    if relation == "left":
        return dx > margin and dx > 2 * abs(dy)
    if relation == "right":
        return -dx > margin and -dx > 2 * abs(dy)
    if relation == "above":
        return dy > margin and dy > 2 * abs(dx)
    if relation == "below":
        return -dy > margin and -dy > 2 * abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def _apart(a: PlacedObject, b: PlacedObject) -> bool:
    return (
        a.left + a.size + GAP <= b.left
        or b.left + b.size + GAP <= a.left
        or a.top + a.size + GAP <= b.top
        or b.top + b.size + GAP <= a.top
    )


def place_objects(scene: Scene, rng: random.Random) -> list[PlacedObject]:
    """Concrete objects for ``scene``: sizes, positions and the colours the caption leaves open."""
    wanted = []
    for group in scene.groups:
        color = group.color or rng.choice(sorted(COLORS))
        wanted.extend((group.shape, color) for _ in range(group.count))
    for _ in range(_MAX_TRIES):
        placed: list[PlacedObject] = []
        for shape, color in wanted:
            size = rng.randint(MIN_SIZE, MAX_SIZE)
            candidate = PlacedObject(
                shape, color, rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size), size
            )
            if not all(_apart(candidate, other) for other in placed):
                break
            placed.append(candidate)
        else:
            if scene.relation is None or _relation_holds(scene.relation, placed[0], placed[1]):
                return placed
    raise RuntimeError(f"could not place {scene} in {_MAX_TRIES} tries")  # unreachable for <= 4 objects of <= 11 px


def draw_objects(objects: list[PlacedObject]):
    """The RGB image (PIL) of placed objects on the background."""
    import numpy as np
    from PIL import Image

    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for obj in objects:
        mask = shape_mask(obj.shape, obj.size, obj.size)
        region = pixels[obj.top : obj.top + obj.size, obj.left : obj.left + obj.size]
        region[mask] = COLORS[obj.color]
    return Image.fromarray(pixels, mode="RGB")


def render_caption(caption: str, rng: random.Random | int = 0):
    """A ground-truth image (PIL, 32x32 RGB) of ``caption``; ``rng`` a Random or a seed."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    return draw_objects(place_objects(parse_caption(caption), rng))
