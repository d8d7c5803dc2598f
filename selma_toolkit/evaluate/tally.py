"""Count human-evaluation answers: win / tie / lose percentages per (variant, baseline) pair, as
the paper reports its human study (SDXL + SELMA preferred in 67.9% of pairs vs 32.1% for the base)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.errors import DatasetError
from selma_toolkit.evaluate.human_eval import ANSWERS_FORMAT
from selma_toolkit.io import read_json


@dataclass(frozen=True)
class Tally:
    """Answers about ``variant`` vs ``baseline``: counts, and percentages of all answers."""

    variant: str
    baseline: str
    win: int
    tie: int
    lose: int

    @property
    def n(self) -> int:
        return self.win + self.tie + self.lose

    @property
    def win_percent(self) -> float:
        return 100.0 * self.win / self.n

    @property
    def tie_percent(self) -> float:
        return 100.0 * self.tie / self.n

    @property
    def lose_percent(self) -> float:
        return 100.0 * self.lose / self.n

    @property
    def win_percent_without_ties(self) -> float | None:
        """The variant's share of the decided pairs (None when every answer was a tie)."""
        decided = self.win + self.lose
        return 100.0 * self.win / decided if decided else None


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """The answers in one exported file; errors name the file and the answer that is wrong."""
    path = Path(path)
    document = read_json(path, missing="answers file not found; export it from the report's human-eval.html page")
    if (
        not isinstance(document, dict)
        or document.get("format") != ANSWERS_FORMAT
        or not isinstance(document.get("answers"), list)
    ):
        raise DatasetError(
            f"{path}: expected an answers file of format {ANSWERS_FORMAT!r} with an 'answers' list "
            "(as exported by human-eval.html)"
        )
    for number, answer in enumerate(document["answers"], start=1):
        problem = _problem(answer)
        if problem:
            raise DatasetError(f"{path}: answer {number}: {problem}")
    return document["answers"]


def _problem(answer: Any) -> str | None:
    if not isinstance(answer, dict):
        return f"expected an object, found {type(answer).__name__}"
    missing = [
        k for k in ("pair", "variant", "baseline", "left", "right", "choice") if not isinstance(answer.get(k), str)
    ]
    if missing:
        return f"missing {', '.join(missing)}"
    if answer["choice"] not in ("left", "right", "tie"):
        return f"choice must be left, right or tie, found {answer['choice']!r}"
    if {answer["left"], answer["right"]} != {answer["variant"], answer["baseline"]}:
        return f"left/right ({answer['left']!r}, {answer['right']!r}) are not the pair's variant and baseline"
    return None


def tally_answers(answers: Iterable[Mapping[str, Any]]) -> list[Tally]:
    """Win / tie / lose of each variant against its baseline. Several raters' files can be passed
    together: every answer counts once (a pair answered by two raters counts twice)."""
    counts: dict[tuple[str, str], list[int]] = {}
    for answer in answers:
        problem = _problem(answer)
        if problem:
            raise DatasetError(f"human-evaluation answer {answer!r}: {problem}")
        slot = counts.setdefault((answer["variant"], answer["baseline"]), [0, 0, 0])
        if answer["choice"] == "tie":
            slot[1] += 1
        elif answer[answer["choice"]] == answer["variant"]:
            slot[0] += 1
        else:
            slot[2] += 1
    return [Tally(variant, baseline, *slot) for (variant, baseline), slot in counts.items()]


def tally_files(paths: Iterable[str | Path]) -> list[Tally]:
    """Read and count one or more answers files."""
    answers: list[dict[str, Any]] = []
    for path in paths:
        answers.extend(read_answers(path))
    if not answers:
        raise DatasetError("the answers files hold no answers")
    return tally_answers(answers)
