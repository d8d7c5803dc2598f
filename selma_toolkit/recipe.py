"""Recipes: TOML files -> validated objects.

Two kinds of recipe:

* a **skill recipe** (``recipes/skills/*.toml``) says how to make one skill's prompts: description,
  instruction for the LLM, seed prompts, counts, de-duplication threshold, LLM settings, or a
  grammar for the offline source;
* a **run recipe** (``recipes/runs/*.toml``) says what to do with them: base model, which skills,
  and the settings of every stage (images, training, merging, evaluation).

Every default is the paper's number (method.md). Unknown keys are errors, with the closest valid
key suggested. ``--set a.b=value`` overrides are parsed as TOML values, then validated like the
file. ``resolved_toml`` / ``recipe_hash`` give the fully resolved recipe that each run writes
next to its outputs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from selma_toolkit.errors import RecipeError
from selma_toolkit.evaluate.scorers import SCORER_NAMES
from selma_toolkit.lora.merging.methods import MergeMethod  # the method table's names as a Literal (no torch)
from selma_toolkit.resources import shipped_run, shipped_skill

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# Marks text a new skill recipe's author must write (selma_toolkit/skill_new.py).
PLACEHOLDER = "<fill in"


# The prompt sources of prompts/sources.py PROMPT_SOURCES (a test keeps the two lists equal; importing
# the prompts package here would be circular).
PromptSourceName = Literal["llm", "grammar"]

class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Skill recipes (stage 1)
# --------------------------------------------------------------------------------------------


class LLMSettings(StrictModel):
    """An OpenAI-compatible endpoint and the sampling settings of the authors' code."""

    api: Literal["chat", "completions"] = "completions"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo-instruct"
    # Name of the environment variable that holds the key; the key itself never enters a recipe.
    api_key_env: str = "OPENAI_API_KEY"
    # None: required unless base_url is on this machine (a local vLLM / llama.cpp / Ollama server).
    api_key_required: bool | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Fraction = 1.0
    max_tokens: PositiveInt = 3072
    concurrency: PositiveInt = 5
    max_retries: Annotated[int, Field(ge=0)] = 5
    timeout: Annotated[float, Field(gt=0)] = 60.0
    # Budgets per invocation (cached answers are free and not counted); the token budget is checked
    # before each request, so the answers in flight may pass it.
    max_requests: PositiveInt | None = None
    max_total_tokens: PositiveInt | None = None
    # Stop when this many requests in a row add no prompt (an endpoint answering garbage).
    max_empty_rounds: PositiveInt = 10
    cache: bool = True


class GrammarSettings(StrictModel):
    """The offline prompt source: templates whose ``{slot}`` fields are filled from word lists."""

    templates: Annotated[list[str], Field(min_length=1)]
    words: dict[str, Annotated[list[str], Field(min_length=1)]]

    @model_validator(mode="after")
    def _slots_have_words(self) -> "GrammarSettings":
        for template in self.templates:
            for slot in re.findall(r"\{(\w+)\}", template):
                base = re.sub(r"\d+$", "", slot)  # {object1}, {object2} both draw from "object"
                if slot not in self.words and base not in self.words:
                    raise ValueError(f"template {template!r} uses slot {{{slot}}} but words has no list {base!r}")
        return self


class SkillRecipe(StrictModel):
    """One skill: how the LLM (or the grammar) is asked for prompts, and how many are kept.

    Request convention (the authors' code): ``instruction`` with ``{n}`` (= prompts_per_request)
    and ``{max_words}`` filled in, followed by ``examples_per_request`` prompts sampled from the
    pool as a numbered list ``1. ...``; the answer is parsed as a numbered list continuing after
    them (numbered or bulleted lines; prose around them is ignored). A candidate is kept when it
    is non-empty, has at most ``max_words`` words, is no exact duplicate and its ROUGE-L F against
    every pool prompt is at most ``similarity_threshold``. See selma_toolkit/prompts/.
    """

    name: Name
    description: str = ""
    source: PromptSourceName = "llm"
    instruction: str = ""
    seeds: Annotated[list[str], Field(min_length=3)]
    num_prompts: PositiveInt = 1000
    similarity_threshold: Fraction = 0.8
    max_words: PositiveInt = 30
    examples_per_request: PositiveInt = 3
    prompts_per_request: PositiveInt = 20
    seed: int = 0
    license: str | None = None
    llm: LLMSettings = LLMSettings()
    grammar: GrammarSettings | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds_not_blank(cls, seeds: list[str]) -> list[str]:
        if any(not s.strip() for s in seeds):
            raise ValueError("seed prompts must not be empty")
        return seeds

    @model_validator(mode="after")
    def _source_has_what_it_needs(self) -> "SkillRecipe":
        if self.source == "llm" and not self.instruction.strip():
            raise ValueError("instruction: must not be empty for source = 'llm' (it is what the LLM is asked)")
        if self.source == "grammar" and self.grammar is None:
            raise ValueError("grammar: source = 'grammar' needs a [grammar] table with templates and words")
        return self

    @model_validator(mode="after")
    def _placeholders_filled_in(self) -> "SkillRecipe":
        # `selma skill new` (skill_new.py) marks text the user must write with PLACEHOLDER.
        texts = {"description": self.description, "instruction": self.instruction,
                 **{f"seeds[{i}]": seed for i, seed in enumerate(self.seeds)}}
        unfilled = [field for field, text in texts.items() if PLACEHOLDER in text]
        if unfilled:
            raise ValueError(f"{', '.join(unfilled)}: still hold{'s' if len(unfilled) == 1 else ''} the {PLACEHOLDER}...> "
                             "text that `selma skill new` wrote; replace it with the skill's own text")
        return self


# --------------------------------------------------------------------------------------------
# Run recipes (stages 2-4 and evaluation)
# --------------------------------------------------------------------------------------------


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
    lora_format: Literal["kohya", "peft"] = "kohya"
    # accelerate trackers to log loss and lr to (besides loss.jsonl / loss.png).
    trackers: list[Literal["tensorboard", "wandb"]] = []

    @field_validator("resolution")
    @classmethod
    def _train_resolution_multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @model_validator(mode="after")
    def _warmup_has_a_scheduler(self) -> "TrainSettings":
        if self.warmup_steps and self.lr_scheduler == "constant":
            raise ValueError(f"warmup_steps = {self.warmup_steps} needs lr_scheduler = 'constant_with_warmup'")
        return self

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> "TrainSettings":
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

    @field_serializer("target_modules")
    def _hash_unset_targets_as_before(self, value: list[str] | None, info: SerializationInfo) -> list[str] | None:
        # Hashes and training fingerprints (dumped with context {"hash": True}) see an unset value as
        # the list that was the default before it became per-family: the UNet families' default,
        # so their recipe hashes and checkpoints stay as they were. Resolved recipes keep it unset.
        if value is None and (info.context or {}).get("hash"):
            return list(UNET_TARGET_MODULES)
        return value


class MergeSettings(StrictModel):
    """Stage 4: merge the experts into one LoRA (the paper: average A and B separately)."""

    method: MergeMethod = "selma"
    # None: uniform 1/T.
    weights: list[float] | None = None
    # Output rank for svd / ties / dare; None = the experts' rank.
    rank: PositiveInt | None = None
    # ties: share of largest-magnitude entries kept; dare: share of entries kept.
    density: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    seed: int = 0


ScorerName = Literal[SCORER_NAMES]  # the scorer registry (evaluate/scorers.py SCORERS)
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
    # DSG/TIFA-style question file (JSONL, CSV or JSON; a local path or a datasets id) and the VQA model that answers it.
    questions: str | None = None
    questions_split: str = "train"
    vqa_model: str = "Salesforce/blip-vqa-base"
    batch_size: PositiveInt = 16
    bootstrap_samples: Annotated[int, Field(ge=100)] = 1000
    # Report: prompts per skill shown in the image grids, and the human-evaluation pairs [variant, baseline]
    # (variants: base, expert:<skill>, joint, merged:<method>); empty = the recipe's merged LoRA vs base.
    report_prompts_per_skill: Annotated[int, Field(ge=0)] = 4
    human_eval_pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = []
    # A paragraph of plain text for the report's "What this run showed" section (e.g. where larger study numbers are).
    report_note: str = ""

    @model_validator(mode="after")
    def _questions_scorer_has_questions(self) -> "EvaluateSettings":
        if "questions" in self.scorers and not self.questions:
            raise ValueError("scorers: 'questions' needs evaluate.questions (a DSG/TIFA-style question file or datasets id)")
        if self.selection_metric is not None and self.selection_metric not in self.scorers:
            raise ValueError(f"selection_metric: {self.selection_metric!r} is not one of scorers {self.scorers}; "
                             "add it to scorers or choose one of them")
        return self


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
    # The scorer that picks the winner; None = the first of evaluate.scorers.
    scorer: ScorerName | None = None
    learning_rate: Annotated[float, Field(gt=0)] = 3e-4
    steps: PositiveInt = 5000
    # None: train.batch_size (pairs per step) / train.checkpoint_every.
    batch_size: PositiveInt | None = None
    checkpoint_every: PositiveInt | None = None


class RunRecipe(StrictModel):
    """A whole SELMA run: base model, skills, and every stage's settings."""

    name: Name
    # A Hub id, a local diffusers folder, or "tiny:sd1" / "tiny:sd2" / "tiny:sdxl" / "tiny:sd3" / "tiny:flux" (embedded).
    base_model: str
    revision: str | None = None
    skills: list[SkillRecipe] = []
    # Existing experts to merge in: catalog names, Hub repo ids or local files.
    experts: list[str] = []
    # Also train one LoRA on the mixture of all skill datasets (the paper's baseline).
    joint: bool = False
    output_dir: str | None = None
    license: str = "creativeml-openrail-m"
    images: ImageSettings = ImageSettings()
    train: TrainSettings = TrainSettings()
    merge: MergeSettings = MergeSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    moe: MoESettings = MoESettings()
    dpo: DPOSettings = DPOSettings()

    @model_validator(mode="after")
    def _skills_unique(self) -> "RunRecipe":
        names = [s.name for s in self.skills]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"skills: each skill may appear once, found {duplicates} more than once")
        if not self.skills and not self.experts:
            raise ValueError("skills: a run needs at least one skill (or one expert in experts)")
        return self

    def skill(self, name: str) -> SkillRecipe:
        """The skill called ``name``, or a RecipeError listing the run's skills."""
        for skill in self.skills:
            if skill.name == name:
                return skill
        raise RecipeError(f"run {self.name!r} has no skill {name!r}; its skills are {[s.name for s in self.skills]}")

    @property
    def image_model(self) -> str:
        """The model that draws the training images (the base model unless weak-to-strong)."""
        return self.images.model or self.base_model


# --------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error names the file, line and column (``FILE: line L, column C:
    TOML syntax error: <what>``); an empty file or one that is not UTF-8 text is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); expected a TOML recipe file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: {_toml_error_position(str(exc), text)}") from None
    if not data:
        what = "the file is empty" if not text.strip() else "the file holds only comments and blank lines"
        raise RecipeError(f"{path}: {what}; expected a TOML recipe (see `selma recipe show tiny-demo` for a run "
                          "recipe, `selma skill new NAME` for a skill recipe)")
    return data


def _toml_error_position(message: str, text: str) -> str:
    """tomllib's ``"<what> (at line L, column C)"`` or ``"<what> (at end of document)"`` (Python 3.11
    keeps no line attributes) as ``"line L, column C: TOML syntax error: <what>"``; the end of the
    document is given as its last line and column, with the usual cause."""
    found = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", message)
    if found:
        what, line, column = found.group(1), int(found.group(2)), int(found.group(3))
        return f"line {line}, column {column}: TOML syntax error: {what}"
    found = re.fullmatch(r"(?s)(.*) \(at end of document\)", message)
    if found:
        lines = text.split("\n")
        return (f"line {len(lines)}, column {len(lines[-1]) + 1}: TOML syntax error: {found.group(1)} at the end of "
                "the file (an unclosed [ array, { table or quoted string?)")
    return f"TOML syntax error: {message}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=100"`` -> (["train", "steps"], 100). The value is read as a TOML value
    (numbers, booleans, strings, arrays); anything that is not valid TOML is taken as a string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw recipe data (validation happens afterwards)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is a value, not a table")
            node = child
        node[parts[-1]] = value
    return data


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The recipe section class at ``loc`` (for suggesting keys), or None."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        args = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = args[0] if args else annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _format_validation_error(source: str, model: type[BaseModel], error: ValidationError) -> RecipeError:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
            lines.append(f"  {path}: unknown key{hint}")
        elif item["type"] == "string_pattern_mismatch" and item.get("ctx", {}).get("pattern") == NAME_PATTERN:
            # A name becomes a folder or file name in the run (skills/<name>/, experts/<name>.safetensors):
            # say so, rather than show the regular expression.
            lines.append(f"  {path}: expected lower-case letters, digits, '-' and '_', starting with a letter or digit "
                         f"(it names folders and files, so no '/', '.' or spaces), e.g. 'shape-count' (found {item.get('input')!r})")
        else:
            found = item.get("input")
            shown = "" if isinstance(found, (dict, list)) else f" (found {found!r})"
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {message}{shown}")
    return RecipeError(f"{source}: invalid recipe\n" + "\n".join(lines))


def _validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(source, model, exc) from None


def skill_recipe_from_dict(data: dict[str, Any], source: str = "<skill>") -> SkillRecipe:
    """Validate raw skill-recipe data; errors name ``source`` and the field path."""
    return _validate(SkillRecipe, data, source)


def _resolve_recipe_path(ref: str, base: Path | None, kind: str) -> Path:
    """A recipe reference: a path (relative to the referring recipe's folder) or a shipped name."""
    path = Path(ref).expanduser()
    candidates = [(base / path).resolve()] if base is not None and not path.is_absolute() else []
    if path.resolve() not in candidates:
        candidates.append(path.resolve())
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = (shipped_skill if kind == "skill" else shipped_run)(ref)
    if shipped is not None and "/" not in ref and not ref.endswith(".toml"):
        return shipped
    tried = ", ".join(str(c) for c in candidates)
    raise RecipeError(f"{kind} recipe {ref!r} not found (looked at {tried}, and for a shipped {kind} of that name)")


def load_skill_recipe(ref: str | Path, overrides: list[str] | None = None) -> SkillRecipe:
    """Load a skill recipe from a path or a shipped name (``"countbench"``)."""
    path = _resolve_recipe_path(str(ref), None, "skill")
    data = apply_overrides(read_toml(path), overrides or [])
    return skill_recipe_from_dict(data, str(path))


def load_run_recipe(ref: str | Path, overrides: list[str] | None = None) -> RunRecipe:
    """Load a run recipe (path or shipped name such as ``"demo"``) with its skill recipes.

    ``skills`` entries are paths relative to the run recipe, shipped skill names, tables
    ``{ recipe = "countbench", num_prompts = 24 }`` (a skill file with values replaced), or whole
    inline skill tables (as in a resolved recipe). Overrides address the run (``train.steps=100``) or one
    skill (``skills.countbench.num_prompts=10``).
    """
    path = _resolve_recipe_path(str(ref), None, "run")
    data = read_toml(path)
    run_overrides, skill_overrides = [], {}
    for text in overrides or []:
        parts, _ = parse_override(text)
        if parts[0] == "skills" and len(parts) >= 3:
            skill_overrides.setdefault(parts[1], []).append(text.split(".", 2)[2])
        else:
            run_overrides.append(text)
    data = apply_overrides(data, run_overrides)
    raw_skills = data.get("skills", [])
    if not isinstance(raw_skills, list):
        raise RecipeError(f"{path}: skills: expected a list of skill recipe paths or tables")
    skills = []
    for index, entry in enumerate(raw_skills):
        if isinstance(entry, str):
            skill_path = _resolve_recipe_path(entry, path.parent, "skill")
            skill_data, source = read_toml(skill_path), str(skill_path)
        elif isinstance(entry, dict) and "recipe" in entry:
            # { recipe = "countbench", num_prompts = 24 }: a skill file with some values replaced.
            skill_path = _resolve_recipe_path(str(entry["recipe"]), path.parent, "skill")
            skill_data, source = _deep_merge(read_toml(skill_path), {k: v for k, v in entry.items() if k != "recipe"}), str(skill_path)
        elif isinstance(entry, dict):
            skill_data, source = dict(entry), f"{path} (skills[{index}])"
        else:
            raise RecipeError(f"{path}: skills[{index}]: expected a path or a table, found {entry!r}")
        name = skill_data.get("name")
        apply_overrides(skill_data, skill_overrides.pop(name, []))
        skills.append(skill_recipe_from_dict(skill_data, source))
    if skill_overrides:
        known = [s.name for s in skills]
        raise RecipeError(f"--set skills.{next(iter(skill_overrides))}...: no such skill in this run; its skills are {known}")
    data["skills"] = skills
    return _validate(RunRecipe, data, str(path))


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(ref: str | Path, overrides: list[str] | None = None) -> SkillRecipe | RunRecipe:
    """Load either kind: a file with ``base_model`` is a run recipe, otherwise a skill recipe."""
    try:
        path = _resolve_recipe_path(str(ref), None, "run")
    except RecipeError:
        path = _resolve_recipe_path(str(ref), None, "skill")
    data = read_toml(path)
    if "base_model" in data or "skills" in data:
        return load_run_recipe(path, overrides)
    return load_skill_recipe(path, overrides)


def _drop_none(value: Any) -> Any:
    # TOML has no null: an unset optional value is left out (it reloads as its default, None).
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def resolved_toml(recipe: SkillRecipe | RunRecipe) -> str:
    """The fully resolved recipe as TOML (skills inline), loadable again with load_recipe."""
    return tomli_w.dumps(_drop_none(recipe.model_dump(mode="json")))


def recipe_hash(recipe: SkillRecipe | RunRecipe) -> str:
    """sha256 of the resolved recipe's canonical JSON: equal recipes, equal hashes."""
    canonical = json.dumps(recipe.model_dump(mode="json", context={"hash": True}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_resolved_recipe(recipe: SkillRecipe | RunRecipe, folder: str | Path) -> Path:
    """Write ``recipe.toml`` (fully resolved) and ``recipe.sha256`` into ``folder``; return the TOML path."""
    from selma_toolkit.io import atomic_write_text

    folder = Path(folder)
    path = folder / "recipe.toml"
    atomic_write_text(path, resolved_toml(recipe))
    atomic_write_text(folder / "recipe.sha256", recipe_hash(recipe) + "\n")
    return path
