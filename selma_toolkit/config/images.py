"""Stage 2's settings (a run recipe's [images])."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from selma_toolkit.config.base import PositiveInt, StrictModel
from selma_toolkit.config.evaluate import ScorerName
from selma_toolkit.config.registries import SCORER_MODEL_FIELDS

# Scorers that cannot judge any prompt on its own (they need a question file of the prompts).
NOT_JUDGES = {"questions": "it answers the questions of a question file, which the skills' prompts do not have"}


class ImageSettings(StrictModel):
    """Stage 2: one image per prompt from the T2I model (50 steps, CFG 7.5 in the paper)."""

    # Generation model when it differs from the trained one (weak-to-strong); None = base_model.
    model: str | None = None
    # For a single-file .safetensors generation model: a local diffusers folder (or tiny:<arch>)
    # of the same architecture that supplies the configs, so nothing is fetched at run time.
    single_file_config: str | None = None
    steps: PositiveInt = 50
    guidance_scale: Annotated[float, Field(ge=0.0)] = 7.5
    resolution: PositiveInt = 512
    negative_prompt: str = ""
    batch_size: PositiveInt = 8
    seed: int = 0
    # auto: float16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # A diffusers scheduler class name (e.g. "DPMSolverMultistepScheduler"); None = the model's own.
    scheduler: str | None = None
    safety_checker: bool = False
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    image_format: Literal["png", "jpg"] = "png"
    # Best-of-N (DreamSync's recipe): draw `candidates` images per prompt (candidate 0 is the image a
    # plain run draws) and keep the one `judge` scores highest; metadata.jsonl records every candidate's
    # score. `judge`: a scorer of the registry (evaluate/scorers.py) that scores any prompt, e.g.
    # "clipscore"; its model is `judge_model` (for clipscore a CLIP folder, Hub id, tiny:clip or
    # toy:judge; None: the scorer's default model), not the [evaluate] section's. dpo.scorer = "judge"
    # picks DPO's preference pairs with the same judge.
    candidates: PositiveInt = 1
    judge: ScorerName | None = None
    judge_model: str | None = None
    judge_batch_size: PositiveInt = 16

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @model_validator(mode="after")
    def _judge_can_choose(self) -> ImageSettings:
        if self.candidates > 1 and self.judge is None:
            raise ValueError(
                f"candidates = {self.candidates} needs a judge to choose among them: set images.judge "
                '(e.g. "clipscore" with images.judge_model), or candidates = 1'
            )
        if self.judge_model is not None and self.judge not in SCORER_MODEL_FIELDS:
            raise ValueError(
                f"judge_model = {self.judge_model!r} is set, but judge = {self.judge!r} has no model to "
                "set; remove judge_model or choose a judge with a model (e.g. clipscore)"
            )
        if self.judge in NOT_JUDGES:
            raise ValueError(
                f"judge = {self.judge!r} cannot score every prompt ({NOT_JUDGES[self.judge]}); use a "
                "scorer that reads the prompt itself: clipscore, pickscore, hps, vqascore, toyworld"
            )
        return self
