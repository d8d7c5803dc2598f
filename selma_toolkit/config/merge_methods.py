"""The merge methods: one record per method, the one list that every other place reads.

Adding a merge method touches two files: its formula in :mod:`~selma_toolkit.lora.merging.formulas`
(a function of one module's inputs, shapes and formula in its docstring) and one
:class:`MethodSpec` in :data:`METHODS` below, which names that function. Everything else reads
this table: the recipe's ``merge.method`` (``MergeMethod``, read by ``config/merge.py``), the diffusers
adapter's methods, ``selma merge``'s ``--method`` / ``--rank`` / ``--density`` / ``--seed`` checks
and help, the ComfyUI node's method list and tooltips, which settings a merge record holds (and so
the merge stage's check that a merged file is current), and whether ``selma merge --add`` can extend a
merge from its own factors (``incremental.py``).

Pure data (it imports only ``errors``), in the config package because the recipe and the CLI read
it at startup, without torch. Formulas are named, and looked up in ``formulas.py`` when a merge runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from selma_toolkit.errors import LoraFormatError


@dataclass(frozen=True)
class MethodSpec:
    """One merge method and its rules.

    ``result``: ``"factors"``: the formula returns the merged module (A_m [r_m, in], B_m [out, r_m],
    scale 1) and keeps the experts' ranks (``kept_rank`` says how, for messages); ``"dense"``: it
    returns one dense update D [out, in] (conv: [out, in*kh*kw]) that the merge re-factors to an
    output rank by truncated SVD (``rank``, default the experts' largest; ``svd_mode`` and, when
    randomized, ``seed``).
    ``low_rank``: for a dense method whose update is a weighted sum of the experts' own low-rank
    updates, the formula in formulas.py that takes its exact truncated SVD from the stacked factors,
    without forming the dense update (used for ``svd_mode="exact"``); empty: the dense update is
    formed and factored.
    ``nonlinear``: why the merge cannot be extended from its own factors; empty for a linear method,
    one where merging [the merged LoRA, new experts] with weights [c, w_new] equals the merge of old
    and new experts with weights [c * w_old, w_new] exactly (what ``selma merge --add`` relies on).
    The other text fields are the words that help texts and error messages use; empty: the rule
    does not apply to the method.
    """

    name: str
    formula: str  # the function's name in formulas.py
    result: Literal["factors", "dense"]
    summary: str  # one line, for help texts and tooltips
    nonlinear: str = ""
    kept_rank: str = ""  # factors: the rank the merge keeps
    equal_ranks: str = ""  # why the experts of a module need one rank; empty: any ranks
    density: str = ""  # what ``density`` means for it; empty: not used
    seed: str = ""  # what ``seed`` means for it (besides a randomized SVD's); empty: not used
    positive_weights: str = ""  # why it needs weights > 0; empty: any finite weights
    low_rank: str = ""  # exact SVD straight from the stacked factors (formulas.py); empty: from the dense update

    @property
    def linear(self) -> bool:
        return not self.nonlinear

    @property
    def dense(self) -> bool:
        """Whether the merge re-factors a dense update to a chosen output rank."""
        return self.result == "dense"


_SVD = "re-factored by a truncated SVD"
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "selma",
            "merge_selma",
            "factors",
            "the paper's rule, A and B factors averaged separately, equal ranks needed",
            kept_rank="the experts' rank",
            equal_ranks="averages the A and B factors",
        ),
        MethodSpec(
            "delta",
            "merge_delta",
            "factors",
            "the exact weighted sum of the updates, rank = sum of ranks",
            kept_rank="every expert (rank = sum of ranks)",
        ),
        MethodSpec(
            "svd",
            "svd_update",
            "dense",
            "the weighted sum re-factored to the output rank by truncated SVD",
            nonlinear=_SVD,
            low_rank="svd_from_factors",
        ),
        MethodSpec(
            "ties",
            "ties_update",
            "dense",
            "sign consensus of the trimmed updates, re-factored like svd",
            nonlinear=f"{_SVD}, with sign elections",
            density="share of largest entries kept",
            positive_weights="elects signs on weighted updates",
        ),
        MethodSpec(
            "dare",
            "dare_update",
            "dense",
            "random drop and rescale of the updates, re-factored like svd",
            nonlinear=f"{_SVD}, with random drop masks",
            density="share of entries kept",
            seed="seed of the drop masks",
        ),
    )
}
DEFAULT_METHOD = "selma"

MERGE_METHODS: tuple[str, ...] = tuple(METHODS)
MergeMethod = Literal[MERGE_METHODS]  # type: ignore[valid-type]  # pydantic: "Input should be 'selma', 'delta', ..."
SvdMode = Literal["exact", "randomized"]
SVD_MODES: tuple[str, ...] = ("exact", "randomized")
FACTORED_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.dense)  # re-factor to a rank
LINEAR_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.linear)
DENSITY_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.density)
SEED_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.seed)
RANK_KEEPING_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if not spec.dense)


def method_spec(method: str) -> MethodSpec:
    """The table's record of ``method``; :class:`LoraFormatError` listing the known ones otherwise."""
    spec = METHODS.get(method)
    if spec is None:
        raise LoraFormatError(f"merge method {method!r} is not known; expected one of {', '.join(MERGE_METHODS)}")
    return spec


def recorded_settings(
    method: str, *, rank: int | None, density: float, seed: int, svd_mode: str = "exact"
) -> dict[str, Any]:
    """The settings a merge record holds for ``method``, each None where the method does not use it:
    rank and svd_mode for the methods that re-factor; density where it has a meaning; seed for the
    methods that draw with it, and for any re-factoring method with the randomized SVD."""
    spec = method_spec(method)
    return {
        "rank": rank if spec.dense else None,
        "density": density if spec.density else None,
        "seed": seed if spec.seed or (spec.dense and svd_mode == "randomized") else None,
        "svd_mode": svd_mode if spec.dense else None,
    }


# ------------------------------------------------------------------------------ help texts


def listing(names: Sequence[str], last: str = "or") -> str:
    """``a, b and c`` (or ``... or c``)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def method_summaries() -> str:
    """``selma: ...; delta: ...; ...``: every method's summary (the ComfyUI node's texts)."""
    return "; ".join(f"{name}: {spec.summary}" for name, spec in METHODS.items())


def density_text() -> str:
    """``ties: share of largest entries kept; dare: share of entries kept``."""
    return "; ".join(f"{name}: {METHODS[name].density}" for name in DENSITY_METHODS)


def seed_text() -> str:
    """``dare: seed of the drop masks``."""
    return "; ".join(f"{name}: {METHODS[name].seed}" for name in SEED_METHODS)


def method_help() -> str:
    """Every method with its summary, for ``selma merge --method``."""
    described = [
        f"{name} ({spec.summary}{'; the default' if name == DEFAULT_METHOD else ''})" for name, spec in METHODS.items()
    ]
    return listing(described) + "."


def rank_help() -> str:
    return f"Output rank for {listing(FACTORED_METHODS, 'and')} (default: the experts' largest)."


def svd_mode_text() -> str:
    """What each SVD mode does, for the CLI's and the nodes' help."""
    return (
        f"exact: the exact truncated SVD (svd: from the experts' factors, no dense update; "
        f"{listing([n for n in FACTORED_METHODS if not METHODS[n].low_rank], 'and')}: of each dense update); "
        "randomized: torch.svd_lowrank of the dense update with the seed, approximate, faster for large layers"
    )


def svd_mode_help() -> str:
    return f"How {listing(FACTORED_METHODS, 'and')} re-factor to the rank: {svd_mode_text()} (default exact)."


def density_help() -> str:
    return f"{density_text()} (default 0.5)."


def seed_help() -> str:
    return f"{seed_text()} (default 0)."
