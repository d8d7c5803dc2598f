"""Evaluation: scorers (CLIPScore, PickScore, HPS v2, ImageReward, VQA questions), scoring of every
variant with bootstrap intervals, the HTML report with a human-evaluation page, and its tally.

Importing this package is light (no torch): models load when a scorer first scores.

Typical use (what ``selma evaluate`` does once images exist)::

    scorers = build_scorers(run.evaluate)                     # checks settings and opt-ins now
    score_variants({"base": {...}, "merged:selma": {...}}, scorers, paths.eval_dir)
    write_report(paths.eval_dir, paths.report.parent, human_eval_pairs=run.evaluate.human_eval_pairs or None)
"""

from selma_toolkit.evaluate.questions import Question, QuestionSet, read_questions
from selma_toolkit.evaluate.report import write_report
from selma_toolkit.evaluate.scorers import (
    SCORER_NAMES,
    Scorer,
    build_scorer,
    build_scorers,
)
from selma_toolkit.evaluate.scoring import (
    EvalItem,
    read_scores,
    score_variants,
    variant_sort_key,
)
from selma_toolkit.evaluate.stats import Interval, bootstrap_interval
from selma_toolkit.evaluate.tally import Tally, tally_answers, tally_files

__all__ = [
    "SCORER_NAMES",
    "EvalItem",
    "Interval",
    "Question",
    "QuestionSet",
    "Scorer",
    "Tally",
    "bootstrap_interval",
    "build_scorer",
    "build_scorers",
    "read_questions",
    "read_scores",
    "score_variants",
    "tally_answers",
    "tally_files",
    "variant_sort_key",
    "write_report",
]
