"""torch's intra-op threads during a merge: one thread, except for the SVDs of large updates."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from selma_toolkit.config.merge_methods import MethodSpec
from selma_toolkit.lora.merging.formulas import Part, dense_shape

THREADED_SVD_ENTRIES = 512 * 512  # dense updates from this size on are factored with every torch thread


def needs_threads(spec: MethodSpec, parts: Sequence[Part]) -> bool:
    """Whether a module's merge is worth torch's intra-op threads: only an SVD of a large update."""
    return spec.dense and math.prod(dense_shape(parts)) >= THREADED_SVD_ENTRIES


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run torch with ``count`` intra-op threads, then restore the setting.

    Sums, stacks, copies and small SVDs of tensors of ~10^5 entries are too small for threads to
    pay: on an idle machine they gain little, and on a busy one every op waits for a descheduled
    worker thread (measured on 2 loaded cores: 15 ms instead of 0.06 ms per add, seconds instead
    of 40 ms for the SVDs of a tiny model's LoRA). Only large SVDs keep every thread.
    """
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
