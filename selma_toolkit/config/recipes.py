"""The two kinds of recipe, put together from the sections of this package.

* a **skill recipe** (``recipes/skills/*.toml``) says how to make one skill's prompts: description,
  instruction for the LLM, seed prompts, counts, de-duplication threshold, LLM settings, or a
  grammar for the offline source;
* a **run recipe** (``recipes/runs/*.toml``) says what to do with them: base model, which skills,
  and the settings of every stage (images, training, merging, evaluation).

Every default is the paper's number (method.md). ``selma_toolkit/recipe.py`` reads them from TOML
(with ``--set`` overrides) and writes the resolved recipe and its hash.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from selma_toolkit.config.base import PLACEHOLDER, Fraction, Name, PositiveInt, StrictModel
from selma_toolkit.config.evaluate import EvaluateSettings
from selma_toolkit.config.images import ImageSettings
from selma_toolkit.config.merge import MergeSettings
from selma_toolkit.config.prompts import GrammarSettings, LLMSettings, PromptSourceName
from selma_toolkit.config.train import DPOSettings, MoESettings, TrainSettings
from selma_toolkit.errors import RecipeError

# --------------------------------------------------------------------------------------------
# Skill recipes (stage 1)
# --------------------------------------------------------------------------------------------


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
    def _source_has_what_it_needs(self) -> SkillRecipe:
        if self.source == "llm" and not self.instruction.strip():
            raise ValueError("instruction: must not be empty for source = 'llm' (it is what the LLM is asked)")
        if self.source == "grammar" and self.grammar is None:
            raise ValueError("grammar: source = 'grammar' needs a [grammar] table with templates and words")
        return self

    @model_validator(mode="after")
    def _placeholders_filled_in(self) -> SkillRecipe:
        # `selma skill new` (skill_new.py) marks text the user must write with PLACEHOLDER.
        texts = {
            "description": self.description,
            "instruction": self.instruction,
            **{f"seeds[{i}]": seed for i, seed in enumerate(self.seeds)},
        }
        unfilled = [field for field, text in texts.items() if PLACEHOLDER in text]
        if unfilled:
            raise ValueError(
                f"{', '.join(unfilled)}: still hold{'s' if len(unfilled) == 1 else ''} the {PLACEHOLDER}...> "
                "text that `selma skill new` wrote; replace it with the skill's own text"
            )
        return self


# --------------------------------------------------------------------------------------------
# Run recipes (stages 2-4 and evaluation)
# --------------------------------------------------------------------------------------------


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
    def _skills_unique(self) -> RunRecipe:
        names = [s.name for s in self.skills]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"skills: each skill may appear once, found {duplicates} more than once")
        if not self.skills and not self.experts:
            raise ValueError("skills: a run needs at least one skill (or one expert in experts)")
        if self.dpo.scorer == "judge" and self.images.judge is None:
            raise ValueError(
                'dpo.scorer = "judge" picks DPO\'s pairs with images.judge, which is not set; set '
                "images.judge (and images.judge_model) or choose a scorer for dpo.scorer"
            )
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


def merge_methods(run: RunRecipe) -> list[str]:
    """The recipe's merge method, then evaluate.merge_methods, each once."""
    return list(dict.fromkeys([run.merge.method, *run.evaluate.merge_methods]))
