"""Several processes drawing one dataset: who draws which prompts, and how they meet.

Processes are started by a launcher and described by accelerate's ``PartialState``:

    accelerate launch --multi_gpu --num_processes N -m selma_toolkit images RECIPE ...
    torchrun --nproc_per_node N -m selma_toolkit images RECIPE ...

Traps (checked on a CPU machine): ``accelerate launch --num_processes 2`` and
``accelerate launch --cpu --num_processes 2`` both start ONE process when there is no GPU
(``--multi_gpu`` is what asks for several, and on CPU they then talk over gloo); and processes
started by torchrun each believe they are alone unless the state is built with ``cpu=True`` on a
machine without CUDA, which :func:`process_state` does.

Prompts are cut into batches in a fixed order first, then batch ``i`` goes to process
``i % N``: every prompt is drawn by exactly one process, and a batch holds the same prompts
whatever N is, so an image does not depend on how many processes drew the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def process_state():
    """This process's ``accelerate.PartialState`` (rank, number of processes, device, barrier).

    Built with ``cpu=True`` when CUDA is absent, so that processes started by torchrun or
    ``accelerate launch --multi_gpu`` on a CPU machine join one gloo process group.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def batches_for_process(items: Sequence[T], batch_size: int, process_index: int, num_processes: int) -> list[list[T]]:
    """Cut ``items`` into consecutive batches of ``batch_size`` and keep every ``num_processes``-th
    one, starting at ``process_index``: the batches this process draws.

    >>> batches_for_process(list(range(7)), 2, 1, 2)
    [[2, 3], [6]]
    """
    if batch_size < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"batch_size {batch_size}, process {process_index} of {num_processes}: out of range")
    batches = [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    return batches[process_index::num_processes]


def gather(state, value: Any) -> list[Any]:
    """``value`` from every process, in process order (one element when running alone)."""
    if state.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def local_device(state) -> str:
    """The device this process draws on, as a string load_pipeline accepts (``cpu``, ``cuda:1``)."""
    device = state.device
    return "cpu" if device.type == "cpu" else str(device)


def finish(state) -> None:
    """Leave the process group (when there is one) so the processes exit cleanly."""
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()
