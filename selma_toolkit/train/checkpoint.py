"""Training checkpoints: ``<train_dir>/checkpoints/step-N/`` holds the full training state
(accelerate ``save_state``: LoRA parameters, optimizer, lr scheduler, RNG states), the expert file
of that step (``<skill>.safetensors``, so evaluation can pick the best step, as the paper does) and
``state.json`` (step, fingerprint of the training setup).

A checkpoint is written into ``.step-N.partial`` and renamed when complete: a crash or a full disk
while saving leaves the previous checkpoint as it was. Resuming compares the saved fingerprint
with the current one and refuses, naming each difference, when the run would not continue the
same training.

Checkpoint state files are this machine's own training state (accelerate stores the optimizer and
RNG states with pickle): resume only from checkpoints you wrote; share expert files, not these.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.errors import RecipeError, Remedy, TrainingError
from selma_toolkit.io import atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings that may change between a run and its resumption: they change how the run is
# carried out or written, not what it computes (the effective batch stays batch_size).
RESUMABLE_CHANGES = {
    "steps",
    "checkpoint_every",
    "cache",
    "lora_format",
    "gradient_checkpointing",
    "micro_batch_size",
    "mixed_precision",
    "trackers",
}


def training_fingerprint(
    run: RunRecipe, skill: str, architecture: str, resolution: int, dataset: str
) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint: the base model, the
    skill, the dataset content and every training setting that changes the result."""
    train = run.train.model_dump(mode="json", context={"hash": True})  # unset targets as before (recipe.py)
    return {
        "base_model": run.base_model,
        "revision": run.revision,
        "architecture": architecture,
        "skill": skill,
        "dataset": dataset,
        "resolution": resolution,
        **{f"train.{key}": value for key, value in sorted(train.items()) if key not in RESUMABLE_CHANGES},
    }


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    state: dict[str, Any]


def checkpoints(train_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints (those with state.json), oldest first."""
    folder = train_dir / "checkpoints"
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append(Checkpoint(int(match.group(1)), path, json.loads((path / STATE_FILE).read_text())))
    return sorted(found, key=lambda c: c.step)


def checkpoint_experts(train_dir: Path) -> list[tuple[int, Path]]:
    """(step, expert file) of every complete checkpoint, oldest first: what evaluation picks from."""
    found = []
    for checkpoint in checkpoints(train_dir):
        expert = checkpoint.path / checkpoint.state["expert"]
        if expert.is_file():
            found.append((checkpoint.step, expert))
    return found


def check_resumable(checkpoint: Checkpoint, fingerprint: dict[str, Any], total_steps: int) -> None:
    """Refuse to resume from ``checkpoint`` when the setup differs, naming every difference."""
    saved = checkpoint.state.get("fingerprint", {})
    changed = [
        f"{key}: {saved.get(key)!r} -> {fingerprint.get(key)!r}"
        for key in sorted(set(saved) | set(fingerprint))
        if saved.get(key) != fingerprint.get(key)
    ]
    if changed:
        raise RecipeError(
            what="cannot resume, this checkpoint was trained with a different setup:",
            where=str(checkpoint.path),
            details=changed,
            remedies=[
                Remedy.do("resume with the recipe it was started with"),
                Remedy.change("out", "folder", note="to train from scratch"),
                Remedy.do(f"train from scratch after removing {checkpoint.path.parent.parent}"),
            ],
        )
    if checkpoint.step > total_steps:
        raise RecipeError(
            f"{checkpoint.path}: the run has already trained {checkpoint.step} steps, more than train.steps = "
            f"{total_steps}; raise train.steps to continue, or take the expert of an earlier step from "
            f"{checkpoint.path.parent}/step-*/"
        )


def save_checkpoint(
    accelerator,
    train_dir: Path,
    step: int,
    fingerprint: dict[str, Any],
    expert_name: str,
    write_expert: Callable[[Path], None],
) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically (see the module docstring); every process
    calls this. ``write_expert(path)`` writes the expert file of this step (main process)."""
    folder = train_dir / "checkpoints"
    final = folder / f"step-{step}"
    partial = folder / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process:
            write_expert(partial / expert_name)
            atomic_write_text(
                partial / STATE_FILE,
                json.dumps({"step": step, "expert": expert_name, "fingerprint": fingerprint}, indent=1),
            )
    except (OSError, RuntimeError, SafetensorError) as exc:
        # A full disk surfaces as OSError (Python writes), RuntimeError (torch.save) or
        # SafetensorError (safetensors): whichever, the partial folder goes, the last checkpoint stays.
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        previous = checkpoints(train_dir)
        kept = (
            f"the previous checkpoint {previous[-1].path.name} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TrainingError(
            f"{partial}: could not write checkpoint step-{step} ({reason}); {kept}. "
            "Free disk space (or fix the folder) and rerun the same command to resume."
        ) from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            # Only when a run re-saves a step it already saved (train.steps lowered then raised).
            old = folder / f".step-{step}.old"
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final
