"""Exact faithfulness in the shapes world: DSG-style questions answered by segmentation.

For each caption, :func:`caption_questions` asks what DSG would (Cho et al., Davidsonian Scene
Graph): one entity question per object group ("is there a circle?"), then, depending on it, its
colour ("is the circle red?") and its count ("are there exactly two red circles?"), and, depending
on both entities, the relation ("is the red circle to the left of the blue square?"). Every
question expects "yes".

:func:`segment` answers them from pixels: each pixel takes the nearest palette colour (or none,
when no colour is near), 4-connected regions of one colour are objects, tiny regions are noise,
and each object's shape is the shape mask (renderer.shape_mask) that overlaps its region best
(IoU) inside its bounding box, if that overlap is high; regions too small, too large or too
elongated to be a shape of this world are no objects. The score of an image is ``100 x`` the share of its questions
answered correctly under DSG's rule (a child of a wrong parent is wrong), as
``selma_toolkit.evaluate.vqa.dsg_score`` computes it. Ground-truth renders score 100.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from selma_toolkit.evaluate.questions import Question
from selma_toolkit.evaluate.vqa import dsg_score
from selma_toolkit.toyworld.renderer import shape_mask
from selma_toolkit.toyworld.world import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, Group, Scene, try_parse_caption

if TYPE_CHECKING:
    from PIL.Image import Image

    from selma_toolkit.config.evaluate import EvaluateSettings

# A pixel farther than this (RGB Euclidean) from every palette colour belongs to no object.
MAX_COLOR_DISTANCE = 110.0
# What counts as an object: rendered objects are 8-11 px squares' worth of box and 32+ pixels, so
# specks, smears and blobs of other sizes (typical of a model that has not learnt the world) are
# not objects, and a region is a shape only if its mask fits that shape's mask well.
MIN_OBJECT_PIXELS = 24
BOX_SIDE = (6, 14)
MAX_ASPECT = 1.4
MIN_SHAPE_IOU = 0.7
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Segment:
    """One object found in an image: colour name, shape (None when no shape fits) and centre (x, y)."""

    color: str
    shape: str | None
    pixels: int
    center: tuple[float, float]


Check = Callable[[Sequence[Segment]], bool]


QUESTION_KINDS = ("entity", "color", "count", "relation")


def _questions_and_checks(scene: Scene) -> list[tuple[Question, Check, str]]:
    """DSG-style questions for a scene, parents before children (ids "1", "2", ...), each with the
    test on the image's segments that answers it and its kind (one of QUESTION_KINDS)."""
    asked: list[tuple[Question, Check, str]] = []

    def ask(text: str, check: Check, parents: tuple[str, ...] = (), kind: str = "entity") -> str:
        qid = str(len(asked) + 1)
        asked.append((Question(id=qid, text=text, parents=parents), check, kind))
        return qid

    entity_ids = []
    for group in scene.groups:
        entity = ask(
            f"is there a {group.shape}?", lambda segs, g=group: any(_matches(s, g, with_color=False) for s in segs)
        )
        entity_ids.append(entity)
        if group.color:
            text = (
                f"is the {group.shape} {group.color}?" if group.count == 1 else f"are the {group.shape}s {group.color}?"
            )
            ask(text, lambda segs, g=group: any(_matches(s, g) for s in segs), (entity,), "color")
        if group.count > 1:
            ask(
                f"are there exactly {_NUMBER_WORDS[group.count]} {group.phrase()}s?",
                lambda segs, g=group: sum(_matches(s, g) for s in segs) == g.count,
                (entity,),
                "count",
            )
    if scene.relation is not None:
        first, second = scene.groups
        words = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}

        def related(segs: Sequence[Segment]) -> bool:
            return any(
                relation_holds(scene.relation, a.center, b.center)
                for a in segs
                if _matches(a, first)
                for b in segs
                if b is not a and _matches(b, second)
            )

        ask(
            f"is the {first.phrase()} {words[scene.relation]} the {second.phrase()}?",
            related,
            tuple(entity_ids),
            "relation",
        )
    return asked


def caption_questions(scene: Scene) -> list[Question]:
    """DSG-style questions for a scene, parents before children; ids "1", "2", ..."""
    return [question for question, _, _ in _questions_and_checks(scene)]


def question_kinds(scene: Scene) -> dict[str, str]:
    """The kind (one of QUESTION_KINDS) of each question id of :func:`caption_questions`."""
    return {question.id: kind for question, _, kind in _questions_and_checks(scene)}


def answer_questions(scene: Scene, segments: Sequence[Segment]) -> dict[str, str]:
    """Answers ("yes"/"no") to :func:`caption_questions` of ``scene``, read from the segments."""
    return {q.id: "yes" if check(segments) else "no" for q, check, _ in _questions_and_checks(scene)}


def key_questions_pass(image: Image, caption: str, kind: str) -> bool | None:
    """Whether every question of ``kind`` (e.g. "count") of the caption is answered right on the
    image, with its parents (DSG's rule); a caption without such questions needs all of them right.
    None outside the grammar. The study's per-question data filter."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"question kind {kind!r}: expected one of {', '.join(QUESTION_KINDS)}")
    scene = try_parse_caption(caption)
    if scene is None:
        return None
    asked = _questions_and_checks(scene)
    answers = answer_questions(scene, segment(image))
    parents = {q.id: q.parents for q, _, _ in asked}
    wanted = [q.id for q, _, k in asked if k == kind] or list(parents)

    def right(qid: str) -> bool:
        return answers[qid] == "yes" and all(right(parent) for parent in parents[qid])

    return all(right(qid) for qid in wanted)


def segment(image: Image) -> list[Segment]:
    """The objects in an image (see the module docstring for the method)."""
    import numpy as np
    from PIL import Image

    if image.size != (IMAGE_SIZE, IMAGE_SIZE):  # e.g. an upscaled copy: box-averaging undoes an integer upscale exactly
        image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    names = ["background", *COLORS]
    palette = np.array([BACKGROUND, *COLORS.values()], dtype=np.float64)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = distance.argmin(axis=-1)
    nearest[distance.min(axis=-1) > MAX_COLOR_DISTANCE] = 0  # far from every colour: no object
    labels = _connected_components(nearest)
    segments = []
    for label in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == label)
        top, left = ys.min(), xs.min()
        region = labels[top : ys.max() + 1, left : xs.max() + 1] == label
        height, width = region.shape
        if (
            len(ys) < MIN_OBJECT_PIXELS
            or not BOX_SIDE[0] <= min(height, width) <= max(height, width) <= BOX_SIDE[1]
            or max(height, width) > MAX_ASPECT * min(height, width)
        ):
            continue
        segments.append(
            Segment(
                color=names[int(nearest[ys[0], xs[0]])],
                shape=_best_shape(region),
                pixels=len(ys),
                center=(float(xs.mean()), float(ys.mean())),
            )
        )
    return segments


def _connected_components(classes):
    """Labels (0 = none) of the 4-connected regions of equal non-zero class.

    Label propagation with numpy (each pixel takes the smallest label of its same-class
    neighbours until nothing changes): scipy.ndimage.label would do this, but scipy is not a
    dependency, and 32x32 images converge in a few dozen vectorised passes.
    """
    import numpy as np

    height, width = classes.shape
    big = height * width + 1
    labels = np.where(classes > 0, np.arange(1, big).reshape(height, width), big)
    while True:
        previous = labels
        padded = np.pad(labels, 1, constant_values=big)
        padded_classes = np.pad(classes, 1, constant_values=0)
        candidates = [labels]
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            neighbour = padded[dy : dy + height, dx : dx + width]
            same = padded_classes[dy : dy + height, dx : dx + width] == classes
            candidates.append(np.where(same, neighbour, big))
        labels = np.where(classes > 0, np.minimum.reduce(candidates), big)
        if np.array_equal(labels, previous):
            return np.where(classes > 0, labels, 0)


def _best_shape(region) -> str | None:
    """The shape whose mask, drawn into the region's bounding box, overlaps it best (IoU)."""
    height, width = region.shape
    best, best_iou = None, MIN_SHAPE_IOU
    for shape in SHAPES:
        mask = shape_mask(shape, width, height)
        iou = (mask & region).sum() / (mask | region).sum()
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether an object centred at ``first`` is ``relation`` (left/right/above/below) of one at
    ``second``: the offset along the relation's axis is positive and dominates the other axis."""
    dx, dy = second[0] - first[0], second[1] - first[1]
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > 1.0 and along > abs(across)


def _matches(segment: Segment, group: Group, with_color: bool = True) -> bool:
    return segment.shape == group.shape and (not with_color or group.color is None or segment.color == group.color)


def score_image(image: Image, caption: str) -> float | None:
    """100 x share of the caption's questions answered correctly (DSG rule); None outside the grammar."""
    scene = try_parse_caption(caption)
    if scene is None:
        return None
    return dsg_score(caption_questions(scene), answer_questions(scene, segment(image)))[0]


class ToyWorldScorer:
    """The ``toyworld`` scorer of ``selma evaluate``: exact DSG-style faithfulness in the shapes world.

    No model: questions come from parsing the caption, answers from segmenting the image. Prompts
    outside the shapes-world grammar get no score (None).
    """

    name = "toyworld"
    label = "Shapes-world DSG"
    model_id = "toyworld-segmentation/1"
    description = (
        "100 x share of DSG-style questions (entity, then colour / count / relation) answered correctly by "
        "exact segmentation of the shapes-world image; ground-truth renders score 100."
    )

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[float | None]:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        return [score_image(image, prompt) for image, prompt in zip(images, prompts)]


def build_toyworld_scorer(settings: EvaluateSettings, device: str | None = None) -> ToyWorldScorer:
    """The ``toyworld`` scorer of the evaluate registry (evaluate/scorers.py ``SCORERS``): no model, no settings."""
    return ToyWorldScorer()
