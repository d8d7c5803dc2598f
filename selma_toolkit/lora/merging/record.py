"""The merge record (``selma.merge`` metadata of a merged LoRA): what recomputes the merge exactly.

Its JSON, in this field order: method, weights (effective), rank, density, seed, svd_mode,
block_weights ({group: g} as given, or null) and experts: for each its name, sha256, skill, base
model, architecture, recipe hash and, for a merge of files, its source (where ``selma merge --add``
finds it again). Settings the method does not use are null (methods.py: ``recorded_settings``).
:class:`MergeRecord` is the one place that builds it, fills in the experts' sha256s and sources,
and writes it (with the common ``selma.*`` fields) into a LoRA's metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from selma_toolkit.config.merge_methods import recorded_settings
from selma_toolkit.lora.core import LoraWeights
from selma_toolkit.lora.metadata import SELMA_PREFIX, guess_architecture, metadata_value

# Metadata key of the merged file: a JSON string with everything needed to recompute the merge.
MERGE_METADATA_KEY = "selma.merge"
_FIELDS = ("method", "weights", "rank", "density", "seed", "svd_mode", "block_weights", "experts")


@dataclass(frozen=True)
class MergeRecord:
    """A merge's record; ``experts`` are JSON objects (see the module docstring), ``extra`` any
    other fields a record read from a file had, kept as they were."""

    method: str
    weights: list[float]
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    svd_mode: str | None = None
    block_weights: dict[str, float] | None = None
    experts: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        method: str,
        weights: Sequence[float],
        experts: list[dict[str, Any]],
        *,
        rank: int | None,
        density: float,
        seed: int,
        svd_mode: str,
        block_weights: dict[str, float] | None,
    ) -> MergeRecord:
        """The record of a merge with these settings, each kept where ``method`` uses it."""
        settings = recorded_settings(method, rank=rank, density=density, seed=seed, svd_mode=svd_mode)
        return cls(method, list(weights), **settings, block_weights=block_weights, experts=experts)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MergeRecord:
        known = {name: raw.get(name) for name in _FIELDS if name in raw}
        return cls(**{"weights": [], "experts": [], **known}, extra={k: v for k, v in raw.items() if k not in _FIELDS})

    @classmethod
    def read(cls, lora: LoraWeights) -> MergeRecord | None:
        """The record in a LoRA's metadata, or None for a LoRA that is no merge."""
        raw = merge_record(lora)
        return cls.from_dict(raw) if raw is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in _FIELDS}, **self.extra}

    def with_files(self, sha256s: Sequence[str | None], sources: Sequence[str | None] | None = None) -> MergeRecord:
        """This record with each expert's sha256 (and ``source``, when given), in the experts' order."""
        if len(sha256s) != len(self.experts) or (sources is not None and len(sources) != len(self.experts)):
            raise ValueError(f"{len(sha256s)} sha256s / {len(sources or [])} sources for {len(self.experts)} experts")
        experts = [{**info, "sha256": digest} for info, digest in zip(self.experts, sha256s)]
        if sources is not None:
            experts = [{**info, "source": source} for info, source in zip(experts, sources)]
        return replace(self, experts=experts)

    def metadata(self) -> dict[str, str]:
        """A merged LoRA's metadata: the record itself under ``selma.merge``, and the common fields of
        lora.metadata (method, weights, block weights, skills, base model, architecture) for tools that
        read those and not the record. Base model and architecture are written when the experts that
        name one agree: so a merge says what it is for even when its tensors do not tell (a small
        model's widths), as each expert's file did."""
        return record_metadata(self.to_dict())

    def write_to(self, lora: LoraWeights) -> LoraWeights:
        """``lora`` with its metadata replaced by this record's (:meth:`metadata`); returns it."""
        lora.metadata = self.metadata()
        return lora


_GUESS: Any = object()


def expert_info(
    name: str, expert: LoraWeights, sha256: str | None = None, *, architecture: str | None = _GUESS
) -> dict[str, str | None]:
    """One expert's entry in a merge record: its name, sha256 and provenance from its file's metadata
    (skill, base model, architecture (guessed unless given), the recipe hash it was trained with)."""
    return {
        "name": name,
        "sha256": sha256,
        "skill": metadata_value(expert, "skill"),
        "base_model": metadata_value(expert, "base_model"),
        "architecture": guess_architecture(expert) if architecture is _GUESS else architecture,
        "recipe_sha256": metadata_value(expert, "recipe_sha256"),
    }


def file_source(path: Path, out: Path, given: str | None = None) -> str:
    """Where a merge of files records an input: ``given`` (a catalog name or Hub repo id the user
    typed), else ``path`` relative to the folder of ``out`` (so a run folder can move), or absolute
    where no relative path exists (another drive)."""
    if given:
        return given
    try:
        return Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()
    except ValueError:
        return str(path.resolve())


def record_metadata(record: dict) -> dict[str, str]:
    """:meth:`MergeRecord.metadata` of a record as a dict (JSON as read from a file)."""
    metadata = {
        MERGE_METADATA_KEY: json.dumps(record),
        SELMA_PREFIX + "method": record["method"],
        SELMA_PREFIX + "weights": json.dumps(list(record["weights"])),
    }
    if record.get("block_weights"):
        metadata[SELMA_PREFIX + "block_weights"] = json.dumps(record["block_weights"])
    skills = [info["skill"] for info in record["experts"] if info.get("skill")]
    if skills:
        metadata[SELMA_PREFIX + "skills"] = json.dumps(skills)
    base_models = {info["base_model"] for info in record["experts"] if info.get("base_model")}
    if len(base_models) == 1:
        metadata[SELMA_PREFIX + "base_model"] = base_models.pop()
    architectures = {info["architecture"] for info in record["experts"] if info.get("architecture")}
    if len(architectures) == 1:
        metadata[SELMA_PREFIX + "architecture"] = architectures.pop()
    return metadata


def merge_record(weights: LoraWeights) -> dict | None:
    """The merge record of a merged LoRA (method, weights, rank, experts...) as JSON, or None."""
    return metadata_record(weights.metadata)


def metadata_record(metadata: Mapping[str, str]) -> dict | None:
    """The merge record in a file's ``__metadata__`` (e.g. read from its header alone), or None."""
    raw = metadata.get(MERGE_METADATA_KEY)
    return json.loads(raw) if raw else None
