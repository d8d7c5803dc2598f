"""What fails: each image's verdict from its questions, and the failing prompts grouped by it.

The judging and grouping half of `selma skill propose` (selma_toolkit/skill_propose.py draws the
images and writes the recipes and the report); the grouping functions are pure:

* :func:`first_failures`: a question answered wrong while its parents were right (DSG's
  dependency rule) is a *first failure*; its kind is what failed.
* :func:`group_by_kind`: a prompt fails a kind when that kind fails first in at least half of its
  images; a kind's *failure rate* is the share of the images asking it in which it fails first; a
  kind is proposed when at least ``min_prompts`` failing prompts fail it and its rate is at least
  ``min_failure_rate`` (a skill the model lacks, not a stray miss).
* :func:`group_by_embedding`: for scorers that give a number and no reason, the failing prompts
  are clustered (spherical k-means, ``k = min(max_skills, failing // min_prompts)``, a
  deterministic farthest-point start) on any text embedding; clusters of ``min_prompts`` or more
  are proposed, named by their most weighted words (:func:`tfidf_embeddings`).
* :func:`question_kind`: the kind of a DSG/TIFA-style question read from its words.
* :func:`judge_for`: a scorer as a judge, whose verdicts say what failed (toyworld, questions) or
  only score (the others).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from selma_toolkit.errors import InputError, Option
from selma_toolkit.evaluate.scorers import SCORER_NAMES, build_scorer
from selma_toolkit.evaluate.vqa import dsg_score
from selma_toolkit.toyworld.scorer import answer_questions, caption_questions, question_kinds, segment
from selma_toolkit.toyworld.world import CaptionError, parse_caption

if TYPE_CHECKING:
    from selma_toolkit.config.evaluate import EvaluateSettings

# Question kinds (the toyworld scorer's, and question_kind's) -> the name of the skill they propose.
KIND_SKILLS = {
    "count": "count",
    "color": "color",
    "relation": "spatial",
    "spatial": "spatial",
    "entity": "objects",
    "objects": "objects",
    "text": "text",
    "attributes": "attributes",
}
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "and",
        "or",
        "in",
        "on",
        "at",
        "to",
        "with",
        "by",
        "for",
        "from",
        "is",
        "are",
        "its",
        "it",
        "this",
        "that",
        "some",
        "one",
    ]
)


@dataclass(frozen=True)
class ImageVerdict:
    """One image's score, the question kinds it asked, and the kinds and questions that failed first."""

    score: float
    asked: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    wrong: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptResult:
    """A prompt of the file (``line`` counts from 1) and the verdicts of its images."""

    line: int
    prompt: str
    verdicts: tuple[ImageVerdict, ...]

    @property
    def score(self) -> float:
        return sum(v.score for v in self.verdicts) / len(self.verdicts)

    def failed_share(self) -> dict[str, float]:
        """Per kind: the share of this prompt's images in which it failed first."""
        counts = Counter(kind for v in self.verdicts for kind in set(v.failed))
        return {kind: counts[kind] / len(self.verdicts) for kind in sorted(counts)}

    def failed_kinds(self) -> list[str]:
        """The kinds that failed first in at least half of this prompt's images."""
        return [kind for kind, share in self.failed_share().items() if share >= 0.5]


@dataclass(frozen=True)
class FailureGroup:
    """Failing prompts that fail the same way: a question kind, or a cluster of their texts."""

    key: str  # the question kind, or "cluster-N"
    skill: str  # the name its skill would get (without prefix)
    prompts: tuple[PromptResult, ...]
    failure_rate: float | None = None  # kinds only: failed-first images / images asking the kind
    proposed: bool = True
    reason: str = ""
    words: tuple[str, ...] = ()  # clusters: their most weighted words


def first_failures(questions: Sequence[Any], answers: dict[str, str], kinds: dict[str, str]) -> ImageVerdict:
    """An image's verdict from its questions (parents first), the answers given and each question's
    kind: the DSG score, and the kinds and texts of the questions answered wrong whose parents were right."""
    score, correct = dsg_score(questions, answers)
    failed, wrong = [], []
    for question in questions:
        if answers[question.id] != question.answer and all(correct[p] for p in question.parents):
            failed.append(kinds[question.id])
            wrong.append(question.text)
    asked = tuple(dict.fromkeys(kinds[q.id] for q in questions))
    return ImageVerdict(score, asked, tuple(dict.fromkeys(failed)), tuple(wrong))


def group_by_kind(
    results: Sequence[PromptResult], threshold: float, *, min_prompts: int = 3, min_failure_rate: float = 0.25
) -> list[FailureGroup]:
    """Group the failing prompts (mean score below ``threshold``) by the kinds they fail (module
    docstring); every kind that failed anywhere is returned, ``proposed`` or with its ``reason``."""
    asked, failed = Counter(), Counter()
    for result in results:
        for verdict in result.verdicts:
            asked.update(set(verdict.asked))
            failed.update(set(verdict.failed))
    groups = []
    for kind in sorted(failed, key=lambda k: (-failed[k] / asked[k], k)):
        members = sorted(
            (r for r in results if r.score < threshold and kind in r.failed_kinds()),
            key=lambda r: (-r.failed_share()[kind], r.score, r.line),
        )
        rate = failed[kind] / asked[kind]
        reasons = []
        if len(members) < min_prompts:
            reasons.append(
                f"{len(members)} failing prompt(s) fail it in half their images or more; at least "
                f"{min_prompts} are needed"
            )
        if rate < min_failure_rate:
            reasons.append(f"its failure rate is below the minimum {min_failure_rate:.0%}")
        groups.append(
            FailureGroup(kind, KIND_SKILLS.get(kind, kind), tuple(members), rate, not reasons, "; ".join(reasons))
        )
    return groups


def tfidf_embeddings(texts: Sequence[str]) -> tuple[Any, list[str]]:
    """L2-normalised TF-IDF word vectors [n, vocabulary] (numpy) and the vocabulary."""
    import numpy as np

    tokens = [[w for w in re.findall(r"[a-z0-9]+", t.lower()) if w not in _STOP and len(w) > 1] for t in texts]
    vocabulary = sorted({w for ts in tokens for w in ts})
    index = {w: i for i, w in enumerate(vocabulary)}
    counts = np.zeros((len(texts), len(vocabulary)))
    for row, ts in enumerate(tokens):
        for w in ts:
            counts[row, index[w]] += 1
    idf = np.log((1 + len(texts)) / (1 + (counts > 0).sum(axis=0))) + 1
    vectors = counts * idf
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1), vocabulary


def group_by_embedding(
    results: Sequence[PromptResult], embeddings: Any, threshold: float, *, min_prompts: int = 3, max_skills: int = 3
) -> list[FailureGroup]:
    """Cluster the failing prompts (mean score below ``threshold``) on ``embeddings`` (one row per
    result, any text embedding) by spherical k-means; clusters of ``min_prompts`` or more are proposed."""
    import numpy as np

    failing = [i for i, r in enumerate(results) if r.score < threshold]
    k = min(max_skills, len(failing) // min_prompts)
    if k < 1:
        return (
            [
                FailureGroup(
                    "cluster-1",
                    "cluster",
                    tuple(results[i] for i in failing),
                    proposed=False,
                    reason=f"{len(failing)} failing prompt(s); at least {min_prompts} are needed",
                )
            ]
            if failing
            else []
        )
    vectors = np.asarray(embeddings, dtype=np.float64)[failing]
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    centres = [0]  # farthest-point start: each next centre is least like the chosen ones
    while len(centres) < k:
        centres.append(int(np.argmin((vectors @ vectors[centres].T).max(axis=1))))
    means = vectors[centres]
    assignment = np.full(len(failing), -1)
    for _ in range(100):
        new = np.argmax(vectors @ means.T, axis=1)
        if np.array_equal(new, assignment):
            break
        assignment = new
        means = np.stack(
            [vectors[assignment == c].sum(axis=0) if (assignment == c).any() else means[c] for c in range(k)]
        )
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    words, vocabulary = tfidf_embeddings([results[i].prompt for i in failing])
    groups = []
    for c in range(k):
        rows = np.nonzero(assignment == c)[0]
        if not len(rows):
            continue
        members = tuple(sorted((results[failing[r]] for r in rows), key=lambda r: (r.score, r.line)))
        weight = words[rows].sum(axis=0)
        top = tuple(vocabulary[i] for i in np.argsort(-weight, kind="stable")[:2] if weight[i] > 0)
        ok = len(members) >= min_prompts
        groups.append(
            FailureGroup(
                f"cluster-{len(groups) + 1}",
                "-".join(top) or "cluster",
                members,
                None,
                ok,
                "" if ok else f"{len(members)} prompt(s) in this cluster; at least {min_prompts} are needed",
                top,
            )
        )
    return sorted(groups, key=lambda g: (not g.proposed, -len(g.prompts), g.key))


_QUESTION_KIND_RULES = (
    ("count", r"\b(how many|exactly|number of|zero|two|three|four|five|six|seven|eight|nine|ten|\d+)\b"),
    (
        "spatial",
        r"\b(left|right|above|below|under|beneath|behind|in front of|next to|beside|on top of|near|between|inside)\b",
    ),
    ("color", r"\b(red|green|blue|yellow|purple|violet|white|black|orange|pink|brown|gr[ae]y|colou?r(ed)?)\b"),
    ("text", r"\b(say|says|written|text|word|words|letters|reads?)\b"),
    ("objects", r"^(is|are) there\b"),
)


def question_kind(text: str) -> str:
    """The kind of a DSG/TIFA-style question read from its words: count, spatial, color, text,
    objects ("is there a dog?"), else attributes; a simple rule, first match wins."""
    lowered = text.lower().strip()
    for kind, pattern in _QUESTION_KIND_RULES:
        if re.search(pattern, lowered):
            return kind
    return "attributes"


# ------------------------------------------------------------------------------------- judges


class _ToyWorldJudge:
    """The toyworld scorer with its question kinds; prompts must be shapes-world captions."""

    name = "toyworld"
    model_id = "toyworld-segmentation/1"

    def check(self, prompt: str) -> str | None:
        try:
            parse_caption(prompt)
        except CaptionError as exc:
            return (
                f"the toyworld scorer reads only shapes-world captions ({exc}); see docs/toyworld.md for the "
                "grammar, or choose another scorer"
            )
        return None

    def judge(self, images: Sequence[Any], prompts: Sequence[str]) -> list[ImageVerdict]:
        verdicts = []
        for image, prompt in zip(images, prompts, strict=True):
            scene = parse_caption(prompt)
            verdicts.append(
                first_failures(caption_questions(scene), answer_questions(scene, segment(image)), question_kinds(scene))
            )
        return verdicts


class _QuestionJudge:
    """The ``questions`` scorer (a VQA model answering a question file); kinds from the questions' words."""

    name = "questions"

    def __init__(self, scorer: Any):
        self.scorer = scorer
        self.model_id = scorer.cache_key

    def check(self, prompt: str) -> str | None:
        if self.scorer.questions.for_prompt(prompt) is None:
            return f"the question file {self.scorer.questions.source} has no questions for this prompt"
        return None

    def judge(self, images: Sequence[Any], prompts: Sequence[str]) -> list[ImageVerdict]:
        verdicts = []
        for image, prompt in zip(images, prompts, strict=True):
            questions = self.scorer.questions.for_prompt(prompt)
            verdicts.append(
                first_failures(
                    questions, self.scorer.answers(image, questions), {q.id: question_kind(q.text) for q in questions}
                )
            )
        return verdicts


class _ScoreJudge:
    """Any other scorer: one number per image, no reason."""

    def __init__(self, scorer: Any):
        self.scorer = scorer
        self.name = scorer.name
        self.model_id = getattr(scorer, "cache_key", scorer.model_id)

    def check(self, prompt: str) -> str | None:
        return None

    def judge(self, images: Sequence[Any], prompts: Sequence[str]) -> list[ImageVerdict]:
        scores = self.scorer.score(list(images), list(prompts))
        return [ImageVerdict(float("nan") if s is None else float(s)) for s in scores]


def check_scorer(scorer: str) -> None:
    """An InputError unless ``scorer`` is one of the evaluation scorers (selma_toolkit/evaluate/scorers.py)."""
    if scorer not in SCORER_NAMES:
        raise InputError(
            what="unknown scorer", where=Option("scorer"), found=scorer, expected=f"one of {', '.join(SCORER_NAMES)}"
        )


def judge_for(scorer: str, settings: EvaluateSettings | None = None) -> Any:
    """The judge of scorer ``scorer`` (its models from ``settings``): ``check(prompt)`` gives why a prompt
    cannot be scored (or None), ``judge(images, prompts)`` an :class:`ImageVerdict` per image."""
    check_scorer(scorer)
    if scorer == "toyworld":
        return _ToyWorldJudge()

    from selma_toolkit.config.evaluate import EvaluateSettings

    settings = settings or EvaluateSettings(scorers=[scorer])
    built = build_scorer(scorer, settings)
    return _QuestionJudge(built) if scorer == "questions" else _ScoreJudge(built)
