"""Stage 3: LoRA skill experts (peft + accelerate) with latent/text caches, checkpoints and resume.

``train_expert(run, skill, paths)`` trains one skill's expert; ``train_joint(run, paths)`` the
paper's baseline, one LoRA on the mixture of all skills' data. ``checkpoint_experts(train_dir)``
lists the expert file of every checkpoint (the paper keeps the best 1,000-step checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from selma_toolkit.lazy import lazy_exports
from selma_toolkit.paths import JOINT, RunPaths

if TYPE_CHECKING:
    from selma_toolkit.recipe import RunRecipe
    from selma_toolkit.train.steps import Progress

# Imported on first use (selma_toolkit/lazy.py): recipe.py imports train/settings.py, and the
# training modules import torch.
_EXPORTS = {"checkpoint": ("checkpoint_experts",), "steps": ("Progress", "TrainEvent"), "loop": ("train_expert",)}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def train_joint(run: RunRecipe, paths: RunPaths, *, progress: Progress | None = None) -> Path:
    """Train one LoRA on the mixture of every skill's dataset (``experts/joint.safetensors``)."""
    from selma_toolkit.train.loop import train_expert

    return train_expert(run, JOINT, paths, progress=progress)


def train_moe(run: RunRecipe, paths: RunPaths, experts: list[tuple[str, Path]], *,
              progress: Progress | None = None) -> Path:
    """The MoE-LoRA baseline (paper Table 4): a gate over the frozen ``experts`` (train/moe.py)."""
    from selma_toolkit.train.moe import train_moe as train

    return train(run, paths, experts, progress=progress)


def train_dpo(run: RunRecipe, paths: RunPaths) -> Path:
    """The DPO variant (paper Table 4): every skill's Diffusion-DPO expert, merged (train/dpo.py)."""
    from selma_toolkit.train.dpo import train_dpo as train

    return train(run, paths)


__all__ = ["JOINT", "Progress", "TrainEvent", "checkpoint_experts", "train_dpo", "train_expert", "train_joint",
           "train_moe"]
