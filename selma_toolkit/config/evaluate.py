"""The evaluation's settings (a run recipe's [evaluate]); the scorers are the registry's (registries.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from selma_toolkit.config.base import PositiveInt, StrictModel
from selma_toolkit.config.benchmarks import BENCHMARK_NAMES, BENCHMARKS
from selma_toolkit.config.merge_methods import MergeMethod
from selma_toolkit.config.registries import SCORER_NAMES

ScorerName = Literal[SCORER_NAMES]  # the scorer registry (registries.py SCORERS)
BenchmarkName = Literal[BENCHMARK_NAMES]  # the published benchmarks (benchmarks.py)
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class EvaluateSettings(StrictModel):
    """Evaluation of base, experts, joint baseline and merged LoRA on held-out prompts."""

    # clipscore, pickscore, hps, imagereward, vqascore (P("yes") to "does this figure show <prompt>?"),
    # questions (DSG/TIFA-style question file answered by vqa_model), toyworld (exact DSG-style
    # faithfulness of shapes-world images by segmentation; no model).
    scorers: Annotated[list[ScorerName], Field(min_length=1)] = ["clipscore"]
    # Held-out prompts per skill (never used for training); 0 = skip evaluation.
    prompts_per_skill: Annotated[int, Field(ge=0)] = 100
    seeds: Annotated[list[int], Field(min_length=1)] = [0]
    # Extra merge methods to compare with the recipe's merge.method.
    merge_methods: list[MergeMethod] = []
    select_checkpoints: bool = False
    # The metric that picks the best checkpoint (one of scorers); None = the first of scorers.
    selection_metric: ScorerName | None = None
    clip_model: str = "openai/clip-vit-large-patch14"
    # PickScore: a CLIP fine-tuned on human preferences, read with the processor of the CLIP it started from.
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    # HPS v2: a transformers CLIP (folder or Hub id), or the authors' pickled open_clip checkpoint
    # ("owner/repo:file.pt" on the Hub, or a local .pt) read into the CLIP architecture of hps_clip_config.
    # A pickled file can run code when loaded: it is read only with hps_allow_pickle = true and hps_sha256 pinned.
    hps_model: str = "xswu/HPSv2:HPS_v2.1_compressed.pt"
    hps_clip_config: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    hps_allow_pickle: bool = False
    hps_sha256: Sha256 | None = None
    # ImageReward (extra `selma-toolkit[eval]`): its pickled checkpoint, read under the same two conditions.
    imagereward_model: str = "THUDM/ImageReward:ImageReward.pt"
    imagereward_allow_pickle: bool = False
    imagereward_sha256: Sha256 | None = None
    # DSG/TIFA-style question file (JSONL, CSV or JSON; a local path or a datasets id) and the VQA model that answers it:
    # BLIP's VQA model, or any image-text-to-text model of transformers (BLIP-2, InstructBLIP, PaliGemma, LLaVA,
    # Qwen2.5-VL, ...; docs/evaluation.md says which to pick). tiny:vqa, tiny:blip2, tiny:paligemma, tiny:llava
    # are the embedded random ones.
    questions: str | None = None
    questions_split: str = "train"
    vqa_model: str = "Salesforce/blip-vqa-base"
    # The image-text-to-text model's weights: auto = bfloat16 on CUDA, float32 elsewhere.
    vqa_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Images per scorer call, and (image, question) pairs per forward pass of a VQA model.
    batch_size: PositiveInt = 16
    bootstrap_samples: Annotated[int, Field(ge=100)] = 1000
    # Report: prompts per skill shown in the image grids, and the human-evaluation pairs [variant, baseline]
    # (variants: base, expert:<skill>, joint, merged:<method>); empty = the recipe's merged LoRA vs base.
    report_prompts_per_skill: Annotated[int, Field(ge=0)] = 4
    human_eval_pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = []
    # A paragraph of plain text for the report's "What this run showed" section (e.g. where larger study numbers are).
    report_note: str = ""
    # A published benchmark run after the evaluation (`selma evaluate RUN --benchmark NAME` runs one on demand):
    # dsg-1k, tifa-v1, genai-bench or dpg-bench, its prompts and questions downloaded on first use at a pinned
    # commit (docs/evaluation.md). Its judge: benchmark_judges[name], else the benchmark's default VQA model.
    benchmark: BenchmarkName | None = None
    benchmark_judges: dict[BenchmarkName, str] = {}
    # The benchmark's seeds (one image per prompt per seed); unset = its protocol's ([0], dpg-bench [0, 1, 2, 3]).
    benchmark_seeds: Annotated[list[int], Field(min_length=1)] | None = None
    # The first N prompts only (0 = all): a quick check, not comparable with published numbers.
    benchmark_prompts: Annotated[int, Field(ge=0)] = 0
    # The variants drawn (base, merged:<method>, expert:<skill>, joint, moe, dpo); empty = base and every merge.
    benchmark_variants: list[str] = []

    @model_validator(mode="after")
    def _questions_scorer_has_questions(self) -> EvaluateSettings:
        if "questions" in self.scorers and not self.questions:
            raise ValueError(
                "scorers: 'questions' needs evaluate.questions (a DSG/TIFA-style question file or datasets id)"
            )
        if self.benchmark is not None:
            benchmark_seeds(self, self.benchmark)
        if self.selection_metric is not None and self.selection_metric not in self.scorers:
            raise ValueError(
                f"selection_metric: {self.selection_metric!r} is not one of scorers {self.scorers}; "
                "add it to scorers or choose one of them"
            )
        return self


def benchmark_seeds(settings: EvaluateSettings, name: str) -> list[int]:
    """The seeds benchmark ``name`` is drawn with: ``benchmark_seeds``, else its protocol's; a protocol
    with a fixed number of images per prompt (DPG-Bench's four) refuses another count (ValueError)."""
    spec = BENCHMARKS[name]
    seeds = list(spec.seeds if settings.benchmark_seeds is None else settings.benchmark_seeds)
    if spec.fixed_images and len(seeds) != len(spec.seeds):
        raise ValueError(
            f"benchmark_seeds: {name} draws {len(spec.seeds)} images per prompt (its protocol), "
            f"so it needs {len(spec.seeds)} seeds, not {len(seeds)}"
        )
    return seeds
