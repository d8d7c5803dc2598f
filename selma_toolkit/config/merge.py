"""Stage 4's settings (a run recipe's [merge]); the methods are the table's (merge_methods.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from selma_toolkit.config.base import PositiveInt, StrictModel
from selma_toolkit.config.merge_methods import MergeMethod


class MergeSettings(StrictModel):
    """Stage 4: merge the experts into one LoRA (the paper: average A and B separately)."""

    method: MergeMethod = "selma"
    # None: uniform 1/T.
    weights: list[float] | None = None
    # Output rank for svd / ties / dare; None = the experts' rank.
    rank: PositiveInt | None = None
    # ties: share of largest-magnitude entries kept; dare: share of entries kept.
    density: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    seed: int = 0
