"""The optimizer-step loop shared by the Table 4 baselines that train something other than one
plain LoRA expert: the MoE-LoRA gate (train/moe.py) and the Diffusion-DPO LoRA (train/dpo.py).

It is train_expert's loop (train/loop.py) with the loss left to the caller: the same accelerator
set-up, optimizer, hand-made accumulation, ``step-N`` checkpoints written atomically with the
output file of each step (train/checkpoint.py), resume refused when the setup changed, loss.jsonl
and loss.png. ``variant_settings`` gives the variant's own learning rate, steps, batch size and
checkpoint interval as a TrainSettings, so every other train.* setting means what it means there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selma_toolkit.io import atomic_write_bytes
from selma_toolkit.recipe import RunRecipe, TrainSettings
from selma_toolkit.train.checkpoint import check_resumable, checkpoints, save_checkpoint
from selma_toolkit.train.logs import LossLog
from selma_toolkit.train.loop import Progress, TrainEvent

log = logging.getLogger(__name__)

MicroLoss = Callable[[torch.nn.Module, int, list[int]], torch.Tensor]  # (model, step, slots) -> mean loss
WriteOutput = Callable[[Path, int], None]  # (path, steps done)


def variant_settings(train: TrainSettings, *, learning_rate: float, steps: int, batch_size: int | None,
                     checkpoint_every: int | None) -> TrainSettings:
    """``train`` with a baseline's own optimisation settings (None: train's value); text encoders
    untrained and caches on (both baselines train on the denoiser from cached conditioning)."""
    return train.model_copy(update={
        "learning_rate": learning_rate, "steps": steps, "batch_size": batch_size or train.batch_size,
        "checkpoint_every": checkpoint_every or train.checkpoint_every, "train_text_encoder": False, "cache": True,
    })


def with_train(run: RunRecipe, settings: TrainSettings) -> RunRecipe:
    """``run`` with other [train] settings (for train/loop.py helpers that read ``run.train``)."""
    return run.model_copy(update={"train": settings})


def finished(train_dir: Path, fingerprint: dict[str, Any], steps: int, output_name: str, output: Path) -> bool:
    """When the last checkpoint is at ``steps``, copy its output file to ``output`` and say so;
    refuse (naming the changes) to continue a checkpoint made with another setup."""
    saved = checkpoints(train_dir)
    if not saved:
        return False
    check_resumable(saved[-1], fingerprint, steps)
    if saved[-1].step != steps:
        return False
    log.info("%s: already trained %d steps; writing %s from %s", train_dir, steps, output, saved[-1].path)
    atomic_write_bytes(output, (saved[-1].path / output_name).read_bytes())
    return True


def run_steps(*, accelerator, settings: TrainSettings, model: torch.nn.Module, train_dir: Path,
              fingerprint: dict[str, Any], output_name: str, micro_loss: MicroLoss, write_output: WriteOutput,
              output: Path, progress: Progress | None = None) -> Path:
    """Train ``model``'s trainable parameters for ``settings.steps`` optimizer steps, resuming from
    the latest checkpoint; write ``output`` at the end (main process). ``micro_loss(model, step,
    slots)`` is the mean loss of the stream positions ``step * batch_size + slot``."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from selma_toolkit.train.loop import _optimizer, _register_lora_state_hooks, micro_batching

    micro, accumulation = micro_batching(settings, accelerator.num_processes)
    params = [p for p in model.parameters() if p.requires_grad]
    set_seed(settings.seed)
    optimizer = _optimizer(settings, params)
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.warmup_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    _register_lora_state_hooks(accelerator)  # checkpoints hold the trainable parameters only
    saved = checkpoints(train_dir)
    start = 0
    if saved:
        check_resumable(saved[-1], fingerprint, settings.steps)
        accelerator.load_state(str(saved[-1].path))
        start = saved[-1].step
        log.info("%s: resuming from %s", train_dir, saved[-1].path)
    per_process = micro * accumulation
    first_slot = accelerator.process_index * per_process

    def optimizer_step(step: int) -> float:
        total = torch.zeros((), device=accelerator.device)
        for micro_step in range(accumulation):
            slots = list(range(first_slot + micro_step * micro, first_slot + (micro_step + 1) * micro))
            with contextlib.ExitStack() as stack:
                if micro_step < accumulation - 1:
                    stack.enter_context(accelerator.no_sync(model))
                with accelerator.autocast():
                    loss = micro_loss(model, step, slots)
                accelerator.backward(loss / accumulation)
            total += loss.detach() / accumulation
        if settings.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return accelerator.gather(total[None]).mean().item()

    loss_log = LossLog(train_dir, start) if accelerator.is_main_process else None
    try:
        for step in range(start, settings.steps):
            began = time.perf_counter()
            loss = optimizer_step(step)
            lr = lr_scheduler.get_last_lr()[0]
            if loss_log is not None:
                loss_log.append({"step": step + 1, "loss": loss, "lr": lr})
                if progress:
                    progress(TrainEvent("step", step + 1, settings.steps, loss, lr, time.perf_counter() - began))
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                save_checkpoint(accelerator, train_dir, step + 1, fingerprint, output_name,
                                lambda path, done=step + 1: write_output(path, done))
                if loss_log is not None:
                    loss_log.plot()
    finally:
        if loss_log is not None:
            loss_log.close()
    if accelerator.is_main_process:
        write_output(output, settings.steps)
    accelerator.wait_for_everyone()
    return output
