"""The files that pass between stages, and their readers: one place for each format.

* **Prompt file** (stage 1 -> 2): JSON lines, one accepted prompt a line:
  ``{"id": 0, "skill": "countbench", "prompt": "...", "source": "llm", "split": "train",
  "max_rouge": 0.41, "request_id": "..."}``. ``id`` counts from 0 in the order prompts were
  accepted; ``split`` is ``train`` (drawn and trained on) or ``heldout`` (evaluation only).
* **Image dataset** (stage 2 -> 3): the Hugging Face ``imagefolder`` layout: images plus
  ``metadata.jsonl`` with ``file_name`` and ``text`` (and seed, model, steps, guidance, prompt_id),
  and a ``.txt`` caption beside each image for kohya tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_toolkit.errors import DatasetError
from selma_toolkit.io import read_jsonl

METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class PromptRecord:
    id: int
    skill: str
    prompt: str
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def read_prompts(path: str | Path, split: str | None = None, *, repair_tail: bool = False) -> list[PromptRecord]:
    """Read a prompt file; ``split`` keeps only ``train`` or ``heldout`` prompts.

    Errors name the file and line: a missing file, malformed JSON, a record without an integer
    ``id`` or a non-empty ``prompt``, or an id that appears twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: prompt file not found; run `selma prompts` for this skill first")
    records, seen = [], set()
    for line, raw in enumerate(read_jsonl(path, repair_tail=repair_tail), start=1):
        if not isinstance(raw.get("id"), int) or not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
            raise DatasetError(
                f"{path}: record {line}: expected an integer 'id' and a non-empty 'prompt', found {raw!r}"
            )
        if raw["id"] in seen:
            raise DatasetError(f"{path}: record {line}: id {raw['id']} appears twice")
        seen.add(raw["id"])
        record = PromptRecord(
            id=raw["id"],
            skill=str(raw.get("skill", "")),
            prompt=raw["prompt"],
            split=str(raw.get("split", "train")),
            extra={k: v for k, v in raw.items() if k not in {"id", "skill", "prompt", "split"}},
        )
        if split is None or record.split == split:
            records.append(record)
    return records


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    text: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def read_image_dataset(folder: str | Path, *, check_files: bool = True) -> list[ImageRecord]:
    """Read an imagefolder dataset (``metadata.jsonl`` + images).

    Errors name the folder and what is wrong: no metadata.jsonl, a row without ``file_name`` or
    ``text``, a file name that leaves the folder, or images that are missing (all listed).
    """
    folder = Path(folder)
    metadata = folder / METADATA
    if not metadata.is_file():
        raise DatasetError(
            f"{folder}: no {METADATA}; expected an image dataset written by `selma images` "
            "(the Hugging Face imagefolder layout)"
        )
    records, missing = [], []
    for line, row in enumerate(read_jsonl(metadata), start=1):
        name, text = row.get("file_name"), row.get("text")
        if not isinstance(name, str) or not isinstance(text, str):
            raise DatasetError(f"{metadata}:{line}: expected 'file_name' and 'text' strings, found {row!r}")
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise DatasetError(f"{metadata}:{line}: file_name {name!r} points outside {folder}")
        if check_files and not path.is_file():
            missing.append(name)
        records.append(
            ImageRecord(path=path, text=text, extra={k: v for k, v in row.items() if k not in {"file_name", "text"}})
        )
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DatasetError(
            f"{folder}: {len(missing)} image(s) listed in {METADATA} are missing: {shown}; "
            "rerun `selma images` to regenerate them"
        )
    if not records:
        raise DatasetError(f"{metadata}: the dataset is empty")
    return records
