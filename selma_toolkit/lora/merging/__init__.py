"""Merging LoRA experts into one LoRA, one concern per module:

* ``formulas.py``: every formula, once, for one module (shapes in the docstrings).
* ``checks.py``: weights, options, experts that fit together.
* ``threads.py``: torch's intra-op threads during a merge.
* ``record.py``: :class:`~.record.MergeRecord`, the ``selma.merge`` metadata of a merged LoRA.
* ``api.py``: ``merge_experts`` and ``merge_files``.

The method table (one :class:`~selma_toolkit.config.merge_methods.MethodSpec` per method: its
formula, factors or dense result, linear or not, what density / seed mean for it, its rank rule,
help texts) is ``selma_toolkit/config/merge_methods.py``: the recipe and the CLI read it without
torch. The public import path is :mod:`selma_toolkit.lora.merge`, which re-exports them. Adding a
merge method: a formula in ``formulas.py`` and one record in the table's ``METHODS``.
"""
