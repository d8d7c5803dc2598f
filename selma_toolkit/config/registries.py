"""The registries: every name a recipe or reference may use, each mapped to the ``"module:object"``
that implements it. These tables are the one list of their names (the recipe's fields accept
exactly these keys); the implementations are imported when they are used (:func:`import_object`),
so reading a table imports none of them, and nothing here imports torch.

Adding an implementation is its module plus one entry here (docs/architecture.md):

* :data:`SCORERS`: ``evaluate.scorers`` names -> a factory ``(EvaluateSettings, device) -> Scorer``
  (the protocol in ``evaluate/scorers.py``);
* :data:`PROMPT_SOURCES`: a skill recipe's ``source`` -> a class opened with ``(SkillRecipe,
  cache_dir)`` that has the ``PromptSource`` protocol (``prompts/sources.py``);
* :data:`MODEL_SOURCES`: a model reference's prefix (``tiny:``, ``toy:``) -> a function turning the
  reference into a local diffusers folder (``ValueError`` when it cannot; ``models.resolve_model``);
* :data:`STAGES`: the stages of a run, in order -> a class with the ``Stage`` protocol
  (``selma_toolkit/stages/``) that ``selma run``, ``selma status`` and the run checks iterate.

The merge methods are a table of records rather than of imports: ``merge_methods.py``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

SCORERS: dict[str, str] = {
    "clipscore": "selma_toolkit.evaluate.scorers:build_clipscore",
    "pickscore": "selma_toolkit.evaluate.scorers:build_pickscore",
    "hps": "selma_toolkit.evaluate.scorers:build_hps",
    "imagereward": "selma_toolkit.evaluate.scorers:build_imagereward",
    "vqascore": "selma_toolkit.evaluate.vqa:build_vqascore",
    "questions": "selma_toolkit.evaluate.vqa:build_question_scorer",
    "toyworld": "selma_toolkit.toyworld.scorer:build_toyworld_scorer",
}
SCORER_NAMES: tuple[str, ...] = tuple(SCORERS)
# The [evaluate] field that names each scorer's model (a scorer without a model, toyworld, has none):
# where the images stage's judge_model goes when that scorer is the judge (images/best_of.py).
SCORER_MODEL_FIELDS: dict[str, str] = {
    "clipscore": "clip_model",
    "pickscore": "pickscore_model",
    "hps": "hps_model",
    "imagereward": "imagereward_model",
    "vqascore": "vqa_model",
    "questions": "vqa_model",
}

# Scorer models shipped with the package, by reference -> a function returning its local folder
# (ValueError when it is missing): what an [evaluate] / [images] model field may name besides a Hub id,
# a folder or a tiny: model.
SHIPPED_SCORER_MODELS: dict[str, str] = {
    "toy:judge": "selma_toolkit.toyworld.judge:judge_dir",  # the shapes world's judge (docs/toyworld.md)
}

PROMPT_SOURCES: dict[str, str] = {
    "llm": "selma_toolkit.prompts.sources:LLMSource",
    "grammar": "selma_toolkit.prompts.sources:GrammarSource",
}

MODEL_SOURCES: dict[str, str] = {
    "tiny:": "selma_toolkit.tiny:ensure_tiny_model",  # the embedded random models
    "toy:": "selma_toolkit.toyworld.model:toy_base_dir",  # the shipped shapes-world bases
}

# In the order they run (and `selma status` lists them); each stage reads only the outputs of the
# stages before it.
STAGES: tuple[str, ...] = (
    "selma_toolkit.stages.prompts:PromptsStage",  # per skill: train + held-out prompts
    "selma_toolkit.stages.images:ImagesStage",  # per skill: one image per train prompt
    "selma_toolkit.stages.train:TrainStage",  # per skill, and joint: the LoRA experts
    "selma_toolkit.stages.select:SelectStage",  # the best checkpoint of each skill
    "selma_toolkit.stages.merge:MergeStage",  # per merge method: the experts merged
    "selma_toolkit.stages.dpo:DPOStage",  # per skill: the Diffusion-DPO experts ([dpo])
    "selma_toolkit.stages.dpo:DPOMergeStage",  # the DPO experts merged
    "selma_toolkit.stages.moe:MoEStage",  # the MoE-LoRA gate over the merged experts ([moe])
    "selma_toolkit.stages.evaluate:EvaluateStage",  # every variant scored, the report
    "selma_toolkit.stages.benchmark:BenchmarkStage",  # [evaluate] benchmark: a published benchmark
)


def import_object(path: str) -> Any:
    """The object a registry entry names as ``"package.module:name"``, imported now."""
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)
