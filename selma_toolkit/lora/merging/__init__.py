"""Merging LoRA experts into one LoRA, one concern per module:

* ``methods.py``: the method table (one :class:`~.methods.MethodSpec` per method: its formula,
  factors or dense result, linear or not, what density / seed mean for it, its rank rule, help
  texts) and the lists and help every other place reads. No torch: recipe.py and the CLI import it.
* ``formulas.py``: every formula, once, for one module (shapes in the docstrings).
* ``checks.py``: weights, options, experts that fit together.
* ``threads.py``: torch's intra-op threads during a merge.
* ``record.py``: :class:`~.record.MergeRecord`, the ``selma.merge`` metadata of a merged LoRA.
* ``api.py``: ``merge_experts`` and ``merge_files``.

The public import path is :mod:`selma_toolkit.lora.merge`, which re-exports them. Adding a merge
method: a formula in ``formulas.py`` and one record in ``methods.py``'s ``METHODS``.
This package's ``__init__`` imports nothing, so that ``methods.py`` stays importable without torch.
"""
