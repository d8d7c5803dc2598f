"""Question files for question-based faithfulness (DSG / TIFA style), read from a local file or a
datasets id that the user gives. Nothing is downloaded at import time.

Each record is one question about one prompt. Column names of the published files are accepted:

| meaning | accepted columns |
| --- | --- |
| prompt text | ``prompt``, ``text`` (DSG-1k), ``caption`` (TIFA) |
| question | ``question``, ``question_natural_language`` (DSG-1k) |
| question id within its prompt | ``question_id``, ``proposition_id`` (DSG-1k); default: 1, 2, ... in file order |
| parents (DSG dependencies) | ``dependency`` (DSG-1k: ``"0"`` none, ``"1,2"``), ``parents``, ``dependencies`` |
| answer choices | ``choices`` (a list, a JSON list, or ``a|b|c``); default ``["yes", "no"]`` |
| expected answer | ``answer``; default ``"yes"`` (every DSG question expects yes) |

Questions are grouped by prompt text, or (``item_column``, as the benchmarks read DSG-1k's
``item_id`` and TIFA's ``id``) by item, each item keeping its prompt: DSG-1k has two items with the
same text and questions.

Formats: ``.jsonl`` (one object a line), ``.json`` (a list of objects, as TIFA's question file),
``.csv`` (as DSG-1k's annotation file); a folder or a Hub dataset id is read with
``datasets.load_dataset(ref, split=...)``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from selma_toolkit.errors import DatasetError
from selma_toolkit.io import read_jsonl

PROMPT_COLUMNS = ("prompt", "text", "caption")
QUESTION_COLUMNS = ("question", "question_natural_language")
ID_COLUMNS = ("question_id", "proposition_id")
PARENT_COLUMNS = ("dependency", "parents", "dependencies")


@dataclass(frozen=True)
class Question:
    """One question about a prompt; ``parents`` are ids of questions it depends on (DSG)."""

    id: str
    text: str
    parents: tuple[str, ...] = ()
    choices: tuple[str, ...] = ("yes", "no")
    answer: str = "yes"


@dataclass(frozen=True)
class QuestionSet:
    """Questions grouped by prompt text, each group ordered so that parents come before children.

    ``items``: when the file names items (a benchmark's ``item_id``), every item in file order as
    ``key -> (prompt, questions)``; two items may share a prompt text only with the same questions."""

    source: str
    by_prompt: dict[str, list[Question]] = field(default_factory=dict)
    items: dict[str, tuple[str, list[Question]]] = field(default_factory=dict)

    def for_prompt(self, prompt: str) -> list[Question] | None:
        """The questions about ``prompt`` (matched after stripping spaces), or None if it has none."""
        return self.by_prompt.get(prompt.strip())

    def prompts(self) -> list[str]:
        """Every prompt with questions, in file order (evaluation prompts for a benchmark)."""
        return list(self.by_prompt)

    @property
    def num_questions(self) -> int:
        return sum(len(q) for q in self.by_prompt.values())


def read_questions(
    ref: str | Path, split: str = "train", item_column: str | None = None, *, as_published: bool = False
) -> QuestionSet:
    """Read a question file (JSONL / JSON / CSV), a dataset folder, or a Hub dataset id.

    ``item_column``: the column naming each record's item (questions are grouped by it rather than
    by prompt text, and ``items`` lists them). Errors (:class:`DatasetError`) name the source, the
    record and what is wrong: a missing column, an unknown parent id, a dependency cycle, an
    expected answer that is not a choice. ``as_published``: a published benchmark's file, whose
    dependencies are read as its authors' code reads them (``questions_from_records``).
    """
    path = Path(str(ref)).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows: Iterable[Mapping[str, Any]] = read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json_list(path)
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            raise DatasetError(
                f"{path}: question file must end in .jsonl, .json or .csv (found {suffix or 'no suffix'!r})"
            )
        return questions_from_records(rows, str(path), item_column, as_published=as_published)
    if path.is_dir() or (str(ref).count("/") == 1 and not str(ref).startswith((".", "/", "~"))):
        return questions_from_records(
            _load_dataset(str(ref), split), f"{ref} (split {split})", item_column, as_published=as_published
        )
    raise DatasetError(
        f"{ref}: question file not found; give a .jsonl/.json/.csv file, a dataset folder, "
        "or a Hugging Face dataset id (owner/name)"
    )


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DatasetError(f"{path}: expected a JSON list of question objects")
    return data


def _load_dataset(ref: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(ref, split=split))
    except Exception as exc:
        raise DatasetError(f"{ref}: could not load the question dataset (split {split!r}): {exc}") from None


def _column(row: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        value = row.get(name)
        if value is not None and value != "":
            return value
    return None


def _as_list(value: Any, *, numeric_sep: bool = False) -> list[str]:
    """A list cell: a list, a JSON list in a string, ``a|b``, or (for dependencies) ``1,2``."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v).strip() for v in json.loads(text)]
        except json.JSONDecodeError:
            pass
    separator = "," if numeric_sep else "|"
    return [part.strip() for part in text.split(separator) if part.strip()]


def _normalise_id(value: Any) -> str:
    text = str(value).strip()
    # DSG-1k CSVs read through pandas/datasets may spell ids as floats ("3.0").
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


def questions_from_records(
    rows: Iterable[Mapping[str, Any]], source: str, item_column: str | None = None, *, as_published: bool = False
) -> QuestionSet:
    """Group question records by prompt (or by ``item_column``), check ids, parents, choices, and
    order parents first.

    ``as_published``: dependencies as DSG-1k's released code reads them, since its file has flaws a
    user's file is refused for (8 of its 1,060 items name a word among their parents, 44 questions
    depend on themselves, 3 items have cycles, one names a question it lacks): an item with a
    dependency cell that is not a list of integers has no dependencies at all, a parent that is the
    question itself or not among its item's questions is dropped, and questions keep the file's
    order (cycles are allowed; see vqa.dsg_score for how parents are then judged). An expected answer
    that is not among the choices is kept: the question can never be answered right, as in TIFA's code.
    Two items may share a prompt text with other questions (two of TIFA's captions are): ``by_prompt``
    keeps the first, and an image is scored by its item (``items``; benchmark_run.py)."""
    grouped: dict[str, tuple[str, list[tuple[int, Question]]]] = {}
    unreadable: set[str] = set()
    for number, row in enumerate(rows, start=1):
        prompt, text = _column(row, PROMPT_COLUMNS), _column(row, QUESTION_COLUMNS)
        if prompt is None or text is None:
            raise DatasetError(
                f"{source}: record {number}: needs a prompt column ({', '.join(PROMPT_COLUMNS)}) and a question "
                f"column ({', '.join(QUESTION_COLUMNS)}); found columns {sorted(row)}"
            )
        prompt = str(prompt).strip()
        if item_column is not None and _column(row, (item_column,)) is None:
            raise DatasetError(f"{source}: record {number}: no {item_column!r}, which names the record's item")
        key = prompt if item_column is None else str(row[item_column]).strip()
        owner, questions = grouped.setdefault(key, (prompt, []))
        if owner != prompt:
            raise DatasetError(
                f"{source}: record {number}: item {key!r} has the prompt {owner[:60]!r} in an earlier "
                f"record and {prompt[:60]!r} here"
            )
        raw_id = _column(row, ID_COLUMNS)
        qid = _normalise_id(raw_id) if raw_id is not None else str(len(questions) + 1)
        listed = _as_list(_column(row, PARENT_COLUMNS), numeric_sep=True)
        parents = tuple(p for p in (_normalise_id(v) for v in listed) if p != "0")
        if as_published and not all(p.isdigit() for p in parents):
            unreadable.add(key)
        choices = tuple(c.lower() for c in _as_list(row.get("choices"))) or ("yes", "no")
        answer = str(row.get("answer") or "yes").strip().lower()
        if answer not in choices and not as_published:  # TIFA's code scores such a question as never right
            raise DatasetError(
                f"{source}: record {number}: expected answer {answer!r} is not among the choices {list(choices)}"
            )
        if any(qid == other.id for _, other in questions):
            raise DatasetError(
                f"{source}: record {number}: question id {qid!r} appears twice for prompt {prompt[:60]!r}"
            )
        questions.append((number, Question(qid, str(text).strip(), parents, choices, answer)))
    if not grouped:
        raise DatasetError(f"{source}: no questions found")
    if as_published:
        ordered = {
            key: (prompt, _published_parents(items, key in unreadable)) for key, (prompt, items) in grouped.items()
        }
    else:
        ordered = {key: (prompt, _parents_first(prompt, items, source)) for key, (prompt, items) in grouped.items()}
    by_prompt: dict[str, list[Question]] = {}
    for key, (prompt, questions) in ordered.items():
        if by_prompt.setdefault(prompt, questions) != questions and not as_published:
            raise DatasetError(
                f"{source}: item {key!r} shares its prompt {prompt[:60]!r} with an earlier item but not "
                "its questions, so an image of that prompt cannot be scored"
            )
    return QuestionSet(source, by_prompt, ordered if item_column is not None else {})


def _published_parents(items: list[tuple[int, Question]], unreadable: bool) -> list[Question]:
    """An item's questions in file order with the parents its authors' code would use (as_published)."""
    ids = {question.id for _, question in items}
    kept = []
    for _, question in items:
        parents = () if unreadable else tuple(p for p in question.parents if p in ids and p != question.id)
        kept.append(replace(question, parents=parents))
    return kept


def _parents_first(prompt: str, items: list[tuple[int, Question]], source: str) -> list[Question]:
    """Order a prompt's questions so every parent precedes its children (a stable topological sort)."""
    by_id = {q.id: (number, q) for number, q in items}
    for number, question in items:
        unknown = [p for p in question.parents if p not in by_id]
        if unknown:
            raise DatasetError(
                f"{source}: record {number}: question {question.id!r} depends on {unknown}, "
                f"which prompt {prompt[:60]!r} has no question with that id"
            )
    ordered: list[Question] = []
    state: dict[str, str] = {}

    def visit(qid: str) -> None:
        if state.get(qid) == "done":
            return
        if state.get(qid) == "visiting":
            raise DatasetError(
                f"{source}: record {by_id[qid][0]}: the dependencies of prompt {prompt[:60]!r} form a "
                f"cycle through question {qid!r}; DSG dependencies must form a tree"
            )
        state[qid] = "visiting"
        for parent in by_id[qid][1].parents:
            visit(parent)
        state[qid] = "done"
        ordered.append(by_id[qid][1])

    for _, question in items:
        visit(question.id)
    return ordered
