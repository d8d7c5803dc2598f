"""The bottom floor of the package: every recipe section, the recipe classes and the registries.

* ``base.py``: ``StrictModel`` (unknown keys are errors) and the shared field types;
* one module per recipe section: ``prompts.py`` ([llm], [grammar]), ``images.py`` ([images]),
  ``train.py`` ([train], [moe], [dpo]), ``merge.py`` ([merge]), ``evaluate.py`` ([evaluate]);
  ``pretrain.py``: the settings of a shapes-world pretraining run;
* ``recipes.py``: ``SkillRecipe`` and ``RunRecipe`` put together from them;
* ``registries.py``: every registry as a table of ``"module:object"`` strings (scorers, prompt
  sources, model sources, stages), loaded on use by ``import_object``;
* ``merge_methods.py``: the merge method table (one record per method).

Nothing here imports torch or any module of the package but ``errors``; stage code imports its
settings from here, and ``selma_toolkit/recipe.py`` reads them from TOML. This ``__init__``
imports nothing, so that the CLI reads the method table without loading pydantic.
"""
