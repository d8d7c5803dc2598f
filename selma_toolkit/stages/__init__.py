"""The stages of a run behind one protocol: :class:`Stage`, one class per module of this package,
listed in order (as ``"module:Class"`` strings, so that listing them imports none) in
``config/registries.py``'s ``STAGES``. ``selma run`` runs them, ``selma status`` shows their
states and the run checks ask each which recipe changes its outputs on disk forbid (run.py,
run_checks.py); ``selma evaluate RUN`` redoes the ones that only combine other stages' outputs.

A stage works on targets (a skill, ``joint``, a merge method, or ``""`` for a stage done once per
run) and reads what it needs from a :class:`RunContext`: the recipe, the run folder's paths and
the experts to merge. Adding a stage is one module here and one entry in ``STAGES``
(docs/architecture.md, "Adding a stage").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.config.registries import STAGES, import_object
from selma_toolkit.errors import SelmaError
from selma_toolkit.evaluate.checkpoints import selected_expert
from selma_toolkit.paths import RunPaths

if TYPE_CHECKING:
    from selma_toolkit.run_checks import ExternalExpert

ProgressCallback = Callable[[str, int, "int | None"], None]  # (label, done, total)


@dataclass(frozen=True)
class StageState:
    """One line of a run's status: a stage for one target (a skill, ``joint``, a merge method, or "")."""

    stage: str
    target: str
    done: bool
    detail: str


def merge_inputs(
    run: RunRecipe, paths: RunPaths, externals: Sequence[ExternalExpert], use_best: bool = True
) -> list[tuple[str, Path]]:
    """(name, file) of every expert to merge, in order: each skill's expert (its best checkpoint
    where a current selection exists and ``use_best``), then the recipe's external experts."""
    chosen = [(s.name, selected_expert(run, paths, s.name) if use_best else paths.expert(s.name)) for s in run.skills]
    return chosen + [(e.name, e.path) for e in externals]


@dataclass
class RunContext:
    """What the stages of one run read: the recipe, the run folder, and the experts to merge.

    ``externals`` are the recipe's listed experts as local files (run_checks.resolve_external_experts);
    ``externals_error`` says why they could not be found, where `selma status` tolerates that.
    """

    run: RunRecipe
    paths: RunPaths
    use_best: bool = True
    externals: Sequence[ExternalExpert] = ()
    externals_error: SelmaError | None = None

    @cached_property
    def experts(self) -> list[tuple[str, Path]]:
        """(name, file) of every expert the merge takes (:func:`merge_inputs`), found on first use:
        after the checkpoint selection has run."""
        if self.externals_error is not None:
            raise self.externals_error
        return merge_inputs(self.run, self.paths, self.externals, self.use_best)

    def missing_experts(self) -> list[str]:
        """What a stage that takes the experts still waits for: their files not written yet, or why
        they cannot be found. Empty when every expert is there."""
        try:
            experts = self.experts
        except SelmaError as exc:
            return [str(exc)]
        return [str(path) for _, path in experts if not path.is_file()]


class Stage:
    """One stage of a run. A subclass sets ``name`` and implements ``targets``, ``outputs``,
    ``state`` and ``run``; the other methods have defaults for a stage that needs none."""

    name: ClassVar[str]  # the stage column of `selma status`
    # True for a stage that only combines other stages' outputs (a merge): `selma evaluate RUN`
    # redoes it, where its inputs exist, when it is out of date.
    redone_before_evaluation: ClassVar[bool] = False

    def targets(self, ctx: RunContext) -> list[str]:
        """What the stage runs for, in order (none: the recipe does not ask for the stage)."""
        raise NotImplementedError

    def inputs(self, ctx: RunContext, target: str) -> list[Path]:
        """The files and folders it reads: earlier stages' outputs (or a listed expert's file)."""
        return []

    def outputs(self, ctx: RunContext, target: str) -> list[Path]:
        """The files and folders it writes in the run folder (selma_toolkit.paths)."""
        raise NotImplementedError

    def state(self, ctx: RunContext, target: str) -> StageState:
        """Done or not, with a detail line for `selma status`; a complete target is skipped."""
        raise NotImplementedError

    def run(self, ctx: RunContext, target: str, progress: ProgressCallback) -> None:
        """Make (or resume) the outputs of ``target``, reporting ``progress(label, done, total)``."""
        raise NotImplementedError

    def check(self, ctx: RunContext) -> None:
        """Refuse settings that would fail later: called for every stage before any work."""

    def check_inputs(self, ctx: RunContext) -> None:
        """Refuse inputs that would fail later: called before its first target runs, once the
        stages before it have run (e.g. every skill's prompts before the first image is drawn)."""

    def recipe_changes(self, old: RunRecipe, new: RunRecipe, paths: RunPaths) -> list[str]:
        """The changes from ``old`` (the recipe recorded in the run folder) to ``new`` that would mix
        results with this stage's outputs on disk, each as ``field: old -> new (why)``: which recipe
        fields its outputs depend on. Empty for a stage whose outputs are redone when their inputs
        change (it checks that in ``state``)."""
        return []


def load_stages() -> list[Stage]:
    """Every stage of the registry (``STAGES``), in order."""
    return [import_object(path)() for path in STAGES]
