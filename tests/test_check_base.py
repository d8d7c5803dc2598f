"""`selma check-base`: are the training images a recipe would make more faithful than its base at
inference? Checked on the shapes world's toy base with the exact scorer (numbers recomputed here)."""

from __future__ import annotations

import json

import pytest

from selma_toolkit.check_base import INFERENCE, RECIPE, check_base, check_settings
from selma_toolkit.recipe import load_run_recipe

SMALL = ["images.steps=3", "images.batch_size=16", "evaluate.batch_size=16"]


def paired(out, setting: str, metric: str = "toyworld") -> list[float]:
    """setting minus inference per (skill, prompt), from scores.json (an independent recomputation)."""
    items = json.loads((out / "scores" / "scores.json").read_text())["items"]
    by = {}
    for item in items:
        by.setdefault(item["variant"], {})[(item["skill"], item["prompt_id"])] = item["scores"][metric]
    return [by[setting][key] - by[INFERENCE][key] for key in sorted(by[INFERENCE])]


def test_best_of_n_by_the_metric_is_never_less_faithful_and_the_margins_are_paired_means(tmp_path):
    run = load_run_recipe("demo", [*SMALL, "images.candidates=2", "images.judge=toyworld"])
    result = check_base(run, tmp_path, prompts_per_skill=3, guidances=[1.0], best_of=[3])
    names = [row["setting"] for row in result["settings"]]
    assert names == [INFERENCE, RECIPE, "guidance-1", "best-of-3"]
    rows = {row["setting"]: row for row in result["settings"]}
    for setting in (RECIPE, "best-of-3"):
        diffs = paired(tmp_path, setting)
        assert len(diffs) == 9
        # Candidate 0 is the inference image, so the metric's own best of N is never below it.
        assert min(diffs) >= 0
        assert rows[setting]["margin"]["mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert rows["guidance-1"]["margin"]["mean"] == pytest.approx(sum(paired(tmp_path, "guidance-1")) / 9)
    assert result["passes"] == (rows[RECIPE]["margin"]["low"] > 0)
    assert result["verdict"].startswith("yes" if result["passes"] else "no")
    assert set(result["clearing"]) == {r for r, row in rows.items() if row.get("margin") and row["margin"]["low"] > 0}
    assert (tmp_path / "check.md").read_text().startswith("# Base check: demo")
    # A rerun reuses every image and score.
    before = (tmp_path / "scores" / "scores.json").read_bytes()
    check_base(run, tmp_path, prompts_per_skill=3, guidances=[1.0], best_of=[3])
    assert (tmp_path / "scores" / "scores.json").read_bytes() == before


def test_a_plain_recipe_trains_on_the_base_own_inference_images_and_the_cli_says_so(cli, tmp_path):
    run = load_run_recipe("demo")
    assert [s.name for s in check_settings(run, None, None)] == [
        INFERENCE,
        "guidance-1",
        "guidance-2",
        "guidance-8",
        "guidance-16",
    ]
    result = cli(
        "check-base",
        "demo",
        "--out",
        str(tmp_path),
        "--prompts-per-skill",
        "2",
        "--guidance",
        "8",
        *(arg for value in SMALL for arg in ("--set", value)),
    )
    assert result.returncode == 0, result.stderr
    assert "no: the recipe's training images are the base's own output at inference" in " ".join(result.stdout.split())
    assert json.loads((tmp_path / "check.json").read_text())["passes"] is False
