"""Stage 2's settings (a run recipe's [images])."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from selma_toolkit.config.base import PositiveInt, StrictModel


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

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value
