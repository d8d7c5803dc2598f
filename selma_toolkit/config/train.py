"""Stage 3's settings (a run recipe's [train]) and the Table 4 baselines' ([moe], [dpo])."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SerializationInfo, field_serializer, field_validator, model_validator

from selma_toolkit.config.base import PositiveInt, StrictModel
from selma_toolkit.config.evaluate import ScorerName

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the SD 1.x / 2.x / XL default (architectures.py)


class TrainSettings(StrictModel):
    """Stage 3: one LoRA expert per skill (rank 128, lr 3e-4 constant, batch 64, 5000 steps)."""

    rank: PositiveInt = 128
    # None: alpha = rank (scale 1).
    alpha: Annotated[float, Field(gt=0)] | None = None
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # None: the family's default (``Family.lora_targets``): to_q, to_k, to_v, to_out.0 for SD 1.x /
    # 2.x / XL; SD 3 and Flux add the joint attention's add_q_proj, add_k_proj, add_v_proj, to_add_out.
    target_modules: Annotated[list[str], Field(min_length=1)] | None = None
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    learning_rate: Annotated[float, Field(gt=0)] = 3e-4
    lr_scheduler: Literal["constant", "constant_with_warmup"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    # Effective batch; reached by gradient accumulation of micro_batch_size when memory is short.
    batch_size: PositiveInt = 64
    micro_batch_size: PositiveInt | None = None
    steps: PositiveInt = 5000
    checkpoint_every: PositiveInt = 1000
    # auto: fp16 on CUDA, no mixed precision on CPU.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    cache: bool = True
    # None: the image resolution.
    resolution: PositiveInt | None = None
    seed: int = 0
    # The expert files' layout (lora/writing.py): None, the family's default (kohya for SD 1.x / 2.x
    # / XL, peft for SD 3 / Flux / Chroma, ai-toolkit for Qwen-Image / Z-Image / FLUX.2 [klein]).
    lora_format: Literal["kohya", "peft", "ai-toolkit"] | None = None
    # accelerate trackers to log loss and lr to (besides loss.jsonl / loss.png).
    trackers: list[Literal["tensorboard", "wandb"]] = []

    @field_validator("resolution")
    @classmethod
    def _train_resolution_multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @model_validator(mode="after")
    def _warmup_has_a_scheduler(self) -> TrainSettings:
        if self.warmup_steps and self.lr_scheduler == "constant":
            raise ValueError(f"warmup_steps = {self.warmup_steps} needs lr_scheduler = 'constant_with_warmup'")
        return self

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> TrainSettings:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size}): "
                "the effective batch is micro_batch_size x gradient-accumulation steps"
            )
        return self

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def denoiser_targets(self, family_targets: tuple[str, ...] | list[str]) -> list[str]:
        """The denoiser's peft target modules: ``target_modules``, or the family's default when unset."""
        return list(self.target_modules if self.target_modules is not None else family_targets)

    @field_serializer("lora_format")
    def _hash_unset_format_as_before(self, value: str | None, info: SerializationInfo) -> str | None:
        # Hashes see an unset value as "kohya", the default before it became per-family (the
        # files of the SD families are the same), so recipe hashes stay as they were.
        if value is None and (info.context or {}).get("hash"):
            return "kohya"
        return value

    @field_serializer("target_modules")
    def _hash_unset_targets_as_before(self, value: list[str] | None, info: SerializationInfo) -> list[str] | None:
        # Hashes and training fingerprints (dumped with context {"hash": True}) see an unset value as
        # the list that was the default before it became per-family: the UNet families' default,
        # so their recipe hashes and checkpoints stay as they were. Resolved recipes keep it unset.
        if value is None and (info.context or {}).get("hash"):
            return list(UNET_TARGET_MODULES)
        return value


class MoESettings(StrictModel):
    """The MoE-LoRA baseline (paper Table 4): the frozen skill experts mixed by a learned gate,
    only the gate trained, on the mixture of all skills' data (lr 1e-5, 5K steps)."""

    # Train it in `selma run` (or `selma train RECIPE --moe`) and evaluate it as variant "moe".
    enabled: bool = False
    # layer: the paper's, a linear gate per layer on the layer input (per token); prompt: one gate on
    # the mean of the text conditioning (one mixture per prompt, the same in every layer).
    gate: Literal["layer", "prompt"] = "layer"
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    steps: PositiveInt = 5000
    # None: train.batch_size / train.checkpoint_every.
    batch_size: PositiveInt | None = None
    checkpoint_every: PositiveInt | None = None


class DPOSettings(StrictModel):
    """The DPO variant (paper Table 4): per skill, two base images per prompt (other seeds), the one
    the scorer prefers wins (ties dropped), Diffusion-DPO on a LoRA (lr 3e-4, 5K steps), the DPO
    experts merged with merge.method."""

    # Train them in `selma run` (or `selma train RECIPE --dpo`) and evaluate the merge as variant "dpo".
    enabled: bool = False
    # Diffusion-DPO's beta (Wallace et al. 2023 use 5000 for SD 1.5, with the per-pixel mean error).
    beta: Annotated[float, Field(gt=0)] = 5000.0
    pairs_per_prompt: PositiveInt = 1
    # The scorer that picks the winner; None = the first of evaluate.scorers; "judge" = the images
    # stage's judge (images.judge with its images.judge_model), so that the evaluation's metric need
    # not be what chooses the training data.
    scorer: ScorerName | Literal["judge"] | None = None
    learning_rate: Annotated[float, Field(gt=0)] = 3e-4
    steps: PositiveInt = 5000
    # None: train.batch_size (pairs per step) / train.checkpoint_every.
    batch_size: PositiveInt | None = None
    checkpoint_every: PositiveInt | None = None
