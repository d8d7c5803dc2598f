"""The settings of a shapes-world pretraining run (`selma toyworld pretrain`), validated like
every recipe section (pydantic), and the names its run folder uses.

In the config package with the other settings: ``toyworld/pretrain.py`` (the loop) and
``toyworld/snapshots.py`` (scoring and exporting its snapshots) both read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selma_toolkit.errors import RecipeError

SKILLS = ("toy-count", "toy-color", "toy-spatial")
STATE_FILE = "state.json"


class PretrainSettings(BaseModel):
    """Everything a pretraining run depends on (recorded in its checkpoint; a resume must match)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    vae_steps: int = Field(600, ge=1)
    vae_batch_size: int = Field(32, ge=1)
    vae_learning_rate: float = Field(2e-3, gt=0)
    kl_weight: float = Field(1e-6, gt=0)
    steps: int = Field(8000, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_max_decay: float = Field(0.999, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    # Held-out faithfulness of the EMA snapshot every eval_every steps (0: never), on eval_prompts
    # prompts per skill drawn with eval_sampling_steps DPM-Solver++ steps at eval_guidance.
    eval_every: int = Field(500, ge=0)
    eval_prompts: int = Field(32, ge=1)
    eval_sampling_steps: int = Field(12, ge=1)
    eval_guidance: float = 4.0
    # What the UNet and text encoder read for each render: "explicit" (the skill grammars' caption
    # itself: `toy:shapes`) or "web" (a web-like partial caption of it, web_captions.py: `toy:shapes-web`).
    captions: Literal["explicit", "web"] = "explicit"
    # A pipeline folder or toy base whose VAE is used as is (stage 1 skipped), e.g. "toy:shapes".
    vae_from: str | None = None

    def __init__(self, **values) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:  # one line per problem, named as the CLI options are
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}" for e in exc.errors()
            )
            raise RecipeError(f"pretraining settings: {problems}") from None


# Changing these between a run and its resumption does not change what was computed so far.
RESUMABLE = ("steps", "checkpoint_every", "eval_every", "eval_prompts", "eval_sampling_steps", "eval_guidance")
