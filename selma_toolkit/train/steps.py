"""The optimizer-step loop, one for every training: a skill expert and the mixture baseline
(train/loop.py), the MoE-LoRA gate (train/moe.py) and the Diffusion-DPO LoRA (train/dpo.py).

``run_steps`` takes prepared-to-be models and a ``micro_loss`` and does the rest: the optimizer
and lr schedule, accelerate's prepare, hand-made accumulation (gradients all-reduced on the last
micro-batch only), ``step-N`` checkpoints written atomically with the output file of each step
(train/checkpoint.py), resume from the latest one (refused when the setup changed), loss.jsonl
and loss.png, trackers. Optimizer step ``step`` consumes stream positions [step*B, (step+1)*B);
this process takes ``micro * accumulation`` consecutive slots of it. ``variant_settings`` gives a
baseline its own learning rate, steps, batch size and checkpoint interval as a TrainSettings, so
every other train.* setting means what it means for an expert.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.config.train import TrainSettings
from selma_toolkit.errors import RecipeError
from selma_toolkit.io import atomic_write_bytes
from selma_toolkit.train.checkpoint import check_resumable, checkpoints, save_checkpoint
from selma_toolkit.train.logs import LossLog
from selma_toolkit.train.model import trainable_parameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainEvent:
    """Progress of a run, for the caller to show: ``cache`` (samples encoded) or ``step``."""

    kind: Literal["cache", "step"]
    done: int
    total: int
    loss: float | None = None
    lr: float | None = None
    seconds: float | None = None


Progress = Callable[[TrainEvent], None]


Progress = Callable[["TrainEvent"], None]
# (the prepared models by name, step, slots) -> the micro-batch's mean loss
MicroLoss = Callable[[Mapping[str, torch.nn.Module], int, list[int]], torch.Tensor]
WriteOutput = Callable[[Path, int], None]  # (path, steps done)


def micro_batching(settings: TrainSettings, num_processes: int) -> tuple[int, int]:
    """(micro-batch size per process, gradient-accumulation steps) that make up batch_size."""
    micro = settings.micro_batch_size or settings.batch_size // num_processes
    if micro < 1 or settings.batch_size % (micro * num_processes):
        raise RecipeError(
            f"train.batch_size ({settings.batch_size}) must be a multiple of micro_batch_size "
            f"({settings.micro_batch_size or 'unset'}) x processes ({num_processes}); set train.micro_batch_size "
            "to a divisor of batch_size / processes"
        )
    return micro, settings.batch_size // (micro * num_processes)


def make_optimizer(settings: TrainSettings, params: list[torch.nn.Parameter]):
    if settings.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RecipeError(
                "train.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes, or use optimizer = 'adamw'"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=1e-2)
    # The diffusers LoRA scripts' defaults: betas (0.9, 0.999), weight decay 1e-2, eps 1e-8.
    return torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def register_lora_state_hooks(accelerator) -> None:
    """Checkpoints hold only the LoRA parameters (``lora_<i>.safetensors``), not the frozen base
    weights accelerate would save with each model (gigabytes per checkpoint)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                state = trainable_parameters(accelerator.unwrap_model(model))
                save_file({k: v.detach().contiguous() for k, v in state.items()}, f"{output_dir}/lora_{i}.safetensors")
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            index = len(models) - 1
            model = accelerator.unwrap_model(models.pop())
            state = load_file(f"{input_dir}/lora_{index}.safetensors")
            expected = set(trainable_parameters(model))
            if set(state) != expected:
                raise RecipeError(
                    f"{input_dir}/lora_{index}.safetensors: holds other LoRA layers than this run has "
                    f"({len(state)} vs {len(expected)} tensors); resume with the recipe it was written with"
                )
            model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def variant_settings(
    train: TrainSettings, *, learning_rate: float, steps: int, batch_size: int | None, checkpoint_every: int | None
) -> TrainSettings:
    """``train`` with a baseline's own optimisation settings (None: train's value); text encoders
    untrained and caches on (both baselines train on the denoiser from cached conditioning)."""
    return train.model_copy(
        update={
            "learning_rate": learning_rate,
            "steps": steps,
            "batch_size": batch_size or train.batch_size,
            "checkpoint_every": checkpoint_every or train.checkpoint_every,
            "train_text_encoder": False,
            "cache": True,
        }
    )


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


def run_steps(
    *,
    accelerator,
    settings: TrainSettings,
    models: Mapping[str, torch.nn.Module],
    train_dir: Path,
    fingerprint: dict[str, Any],
    output_name: str,
    micro_loss: MicroLoss,
    write_output: WriteOutput,
    output: Path,
    progress: Progress | None = None,
    loss_record: Callable[[int], dict[str, Any]] | None = None,
    tracker_run: str | None = None,
) -> Path:
    """Train ``models``' trainable parameters for ``settings.steps`` optimizer steps, resuming from
    the latest checkpoint; write ``output`` at the end (main process). ``micro_loss(models, step,
    slots)`` is the mean loss of the stream positions ``step * batch_size + slot`` computed with the
    prepared (possibly DDP-wrapped) models; ``loss_record(step)`` adds fields to a step's loss.jsonl
    row; ``tracker_run`` names the run in train.trackers."""
    from diffusers.optimization import get_scheduler

    micro, accumulation = micro_batching(settings, accelerator.num_processes)
    params = [p for model in models.values() for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(settings, params)
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.warmup_steps)
    prepared = accelerator.prepare(*models.values(), optimizer, lr_scheduler)
    wrapped = dict(zip(models, prepared[: len(models)]))
    optimizer, lr_scheduler = prepared[len(models) :]
    register_lora_state_hooks(accelerator)  # checkpoints hold the trainable parameters only
    saved = checkpoints(train_dir)
    start = 0
    if saved:
        check_resumable(saved[-1], fingerprint, settings.steps)
        accelerator.load_state(str(saved[-1].path))
        start = saved[-1].step
        log.info("%s: resuming from %s", train_dir, saved[-1].path)
    if settings.trackers and tracker_run:
        accelerator.init_trackers(
            tracker_run,
            config={k: v for k, v in settings.model_dump().items() if isinstance(v, (int, float, str, bool))},
        )
    per_process = micro * accumulation
    first_slot = accelerator.process_index * per_process

    def optimizer_step(step: int) -> float:
        """One optimizer step on this process's slots of the batch; the whole batch's mean loss."""
        total = torch.zeros((), device=accelerator.device)
        for micro_step in range(accumulation):
            slots = list(range(first_slot + micro_step * micro, first_slot + (micro_step + 1) * micro))
            # Gradients are all-reduced only on the last micro-batch of the step (DDP wants the
            # forward passes, trained text encoders' included, inside no_sync too).
            with contextlib.ExitStack() as stack:
                if micro_step < accumulation - 1:
                    for model in wrapped.values():
                        stack.enter_context(accelerator.no_sync(model))
                with accelerator.autocast():
                    loss = micro_loss(wrapped, step, slots)
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
            if settings.trackers and tracker_run:
                accelerator.log({"loss": loss, "lr": lr}, step=step + 1)
            if loss_log is not None:
                loss_log.append(
                    {"step": step + 1, "loss": loss, "lr": lr, **(loss_record(step) if loss_record else {})}
                )
                if progress:
                    progress(TrainEvent("step", step + 1, settings.steps, loss, lr, time.perf_counter() - began))
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                save_checkpoint(
                    accelerator,
                    train_dir,
                    step + 1,
                    fingerprint,
                    output_name,
                    lambda path, done=step + 1: write_output(path, done),
                )
                if loss_log is not None:
                    loss_log.plot()
    finally:
        if loss_log is not None:
            loss_log.close()
    if settings.trackers and tracker_run:
        accelerator.end_training()
    if accelerator.is_main_process:
        write_output(output, settings.steps)
    accelerator.wait_for_everyone()
    return output
