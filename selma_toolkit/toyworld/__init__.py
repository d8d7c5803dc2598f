"""The shapes world: a verifiable mini-benchmark and a pretrained toy base model (``toy:shapes``).

* ``world.py``: vocabulary and caption grammar; ``renderer.py``: ground-truth 32x32 renders;
* ``scorer.py``: DSG-style questions answered by segmentation (the ``toyworld`` scorer);
* ``model.py``: the SD-architecture toy pipeline; ``pretrain.py``: rebuild it from a seed;
  ``snapshots.py``: score and export pretraining snapshots;
* ``study.py``: the SELMA experiment on it (``selma toyworld study``); ``study_report.py``: its summary.

Importing this package is light: torch and diffusers load inside the functions that need them.
"""
