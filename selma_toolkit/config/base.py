"""What every recipe section is built from: a strict pydantic model (unknown keys are errors) and
the shared field types. Each stage's section is a module of this package (``prompts.py``,
``images.py``, ``train.py``, ``merge.py``, ``evaluate.py``); ``recipes.py`` puts them together into
the skill and run recipes, and ``selma_toolkit/recipe.py`` loads them from TOML."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# Marks text a new skill recipe's author must write (selma_toolkit/skill_new.py).
PLACEHOLDER = "<fill in"


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
