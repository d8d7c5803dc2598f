"""Scores of every variant (files, aggregates, resume), bootstrap intervals, the report folder,
the human-evaluation pairs and the tally of their answers, and the `selma evaluate` command."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from support_evaluate import (
    PROMPTS,
    VARIANTS,
    drawn_image,
    scored_eval_dir,
    variant_items,
)

from selma_toolkit.errors import DatasetError
from selma_toolkit.evaluate import (
    EvalItem,
    bootstrap_interval,
    build_scorers,
    read_scores,
    score_variants,
    tally_answers,
    write_report,
)
from selma_toolkit.evaluate.human_eval import build_pairs
from selma_toolkit.recipe import EvaluateSettings


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    return scored_eval_dir(tmp_path_factory.mktemp("evaluation"))


def test_bootstrap_interval_contains_the_mean_and_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(50, 10, 40), rng.normal(50, 10, 4000)
    a, b = bootstrap_interval(small), bootstrap_interval(large)
    assert a.low < a.mean < a.high and b.low < b.mean < b.high
    assert a.mean == pytest.approx(small.mean()) and (a.n, b.n) == (40, 4000)
    assert 6 < (a.high - a.low) / (b.high - b.low) < 14  # sqrt(4000 / 40) = 10
    # For many values the percentile interval is the normal one: mean +- 1.96 sd / sqrt(n).
    half = 1.96 * large.std(ddof=1) / np.sqrt(large.size)
    assert (b.high - b.low) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_interval(small) == a  # seeded
    assert bootstrap_interval([3.0]) == bootstrap_interval([3.0], samples=10) and bootstrap_interval([3.0]).low == 3.0


def test_scores_json_holds_every_variant_with_aggregates_of_its_images(eval_dir):
    document = read_scores(eval_dir)
    assert document["variants"] == list(VARIANTS) and document["skills"] == list(PROMPTS)
    assert set(document["scorers"]) == {"clipscore", "vqascore"}
    assert document["scorers"]["clipscore"]["model"] == "tiny:clip"
    items = document["items"]
    assert len(items) == len(VARIANTS) * sum(len(p) for p in PROMPTS.values())
    assert all((eval_dir / item["image"]).is_file() for item in items)
    for variant in VARIANTS:
        for skill in PROMPTS:
            values = [i["scores"]["vqascore"] for i in items if i["variant"] == variant and i["skill"] == skill]
            stats = document["aggregate"][variant]["skills"][skill]["vqascore"]
            assert stats["mean"] == pytest.approx(np.mean(values)) and stats["n"] == len(values)
            assert stats["low"] <= stats["mean"] <= stats["high"]
        overall = [i["scores"]["clipscore"] for i in items if i["variant"] == variant]
        assert document["aggregate"][variant]["overall"]["clipscore"]["mean"] == pytest.approx(np.mean(overall))
    with open(eval_dir / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(items) and float(rows[0]["clipscore"]) == pytest.approx(items[0]["scores"]["clipscore"])
    with open(eval_dir / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert {(r["variant"], r["skill"]) for r in summary} == {(v, s) for v in VARIANTS for s in ["(all)", *PROMPTS]}


class CountingScorer:
    """Passes through to a real scorer and counts the images it was asked to score."""

    def __init__(self, scorer):
        self.scorer, self.scored = scorer, 0
        self.name, self.label, self.model_id, self.description = (
            scorer.name,
            scorer.label,
            scorer.model_id,
            scorer.description,
        )

    def score(self, images, prompts):
        self.scored += len(images)
        return self.scorer.score(images, prompts)


def test_rescoring_scores_only_new_or_changed_images(tmp_path, eval_dir):
    copy = tmp_path / "eval"
    shutil.copytree(eval_dir, copy)
    [scorer] = build_scorers(EvaluateSettings(scorers=["clipscore"], clip_model="tiny:clip"))
    counting = CountingScorer(scorer)
    before = read_scores(copy)
    again = score_variants(variant_items(), [counting], copy, bootstrap_samples=200)
    assert counting.scored == 0
    assert [i["scores"]["clipscore"] for i in again["items"]] == [i["scores"]["clipscore"] for i in before["items"]]
    changed = variant_items()
    changed["base"]["color"][0] = EvalItem(drawn_image(99), "a red cube", seed=0, prompt_id=0)
    score_variants(changed, [counting], copy, bootstrap_samples=200)
    assert counting.scored == 1


def test_missing_image_file_is_a_clear_error(tmp_path):
    [scorer] = build_scorers(EvaluateSettings(scorers=["clipscore"], clip_model="tiny:clip"))
    with pytest.raises(DatasetError, match=r"missing\.png: evaluation image of base / color #0 not found"):
        score_variants({"base": {"color": [EvalItem(tmp_path / "missing.png", "a cube")]}}, [scorer], tmp_path / "eval")


def referenced_files(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)=['"]([^'"#]+)['"]""", page)


def test_report_folder_is_self_contained_and_shows_every_variant(tmp_path, eval_dir):
    index = write_report(eval_dir, tmp_path / "report")
    page = index.read_text()
    references = referenced_files(page)
    assert references and all(not Path(r).is_absolute() and ".." not in r for r in references)
    assert all((index.parent / r).is_file() for r in references)
    assert {f"plots/{m}.png" for m in ("clipscore", "vqascore")} <= set(references)
    assert all(variant in page for variant in VARIANTS) and "a red cube" in page
    assert "comparable only between runs that used the same VQA model" in page
    human = (index.parent / "human-eval.html").read_text()
    pairs = json.loads(re.search(r'<script id="pairs" type="application/json">(.*?)</script>', human, re.S).group(1))
    assert len(pairs) == sum(len(p) for p in PROMPTS.values())
    assert {p["variant"] for p in pairs} == {"merged:selma"} and {p["baseline"] for p in pairs} == {"base"}
    assert {p["left"]["variant"] for p in pairs} == {"merged:selma", "base"}  # sides drawn at random
    assert all({p["left"]["variant"], p["right"]["variant"]} == {"merged:selma", "base"} for p in pairs)
    assert all((index.parent / p[side]["src"]).is_file() for p in pairs for side in ("left", "right"))


def test_human_eval_pairs_must_name_existing_variants(eval_dir):
    with pytest.raises(DatasetError, match=r"no variant 'merged:ties'.*variants are"):
        build_pairs(read_scores(eval_dir), [["merged:ties", "base"]])
    pairs = build_pairs(read_scores(eval_dir), [["expert:count", "base"]], max_pairs=2)
    assert len(pairs) == 2 and {p["variant"] for p in pairs} == {"expert:count"}


def answers_file(path: Path, wins: int, ties: int, losses: int) -> Path:
    """Answers where the variant sits on alternating sides: ``wins`` chose it, ``losses`` the baseline."""
    answers = []
    for n, outcome in enumerate(["win"] * wins + ["tie"] * ties + ["lose"] * losses):
        left, right = ("merged:selma", "base") if n % 2 else ("base", "merged:selma")
        chosen = {"win": "merged:selma", "lose": "base"}.get(outcome)
        choice = "tie" if chosen is None else ("left" if left == chosen else "right")
        answers.append(
            {
                "pair": f"p{n}",
                "variant": "merged:selma",
                "baseline": "base",
                "prompt": "x",
                "left": left,
                "right": right,
                "choice": choice,
            }
        )
    path.write_text(json.dumps({"format": "selma-human-eval/1", "study": "s", "answers": answers}))
    return path


def test_tally_gives_win_tie_lose_percentages_from_the_variants_side(tmp_path):
    answers = json.loads(answers_file(tmp_path / "a.json", wins=6, ties=1, losses=3).read_text())["answers"]
    [tally] = tally_answers(answers)
    assert (tally.variant, tally.baseline, tally.win, tally.tie, tally.lose) == ("merged:selma", "base", 6, 1, 3)
    assert (tally.win_percent, tally.tie_percent, tally.lose_percent) == (60.0, 10.0, 30.0)
    assert tally.win_percent_without_ties == pytest.approx(200 / 3)


def test_evaluate_tally_command_prints_percentages_and_rejects_bad_files(cli, tmp_path):
    first = answers_file(tmp_path / "rater1.json", wins=6, ties=1, losses=3)
    second = answers_file(tmp_path / "rater2.json", wins=2, ties=0, losses=8)
    result = cli("evaluate", "--tally", str(first), "--tally", str(second))
    assert result.returncode == 0, result.stderr
    assert (
        "merged:selma vs base: win 40.0%, tie 5.0%, lose 55.0% of 20 answers (42.1% vs 57.9% without ties)"
        in result.stdout
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "format": "selma-human-eval/1",
                "answers": [{"pair": "p", "variant": "a", "baseline": "b", "left": "a", "right": "b", "choice": "up"}],
            }
        )
    )
    result = cli("evaluate", "--tally", str(bad))
    assert result.returncode == 2 and "answer 1: choice must be left, right or tie" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_report_command_writes_the_report_beside_the_evaluation(cli, tmp_path, eval_dir):
    run = tmp_path / "run"
    shutil.copytree(eval_dir, run / "eval")
    result = cli("evaluate", "--report", str(run / "eval"), "--pair", "expert:color,base")
    assert result.returncode == 0, result.stderr
    assert (run / "report" / "index.html").is_file() and "expert:color" in (
        run / "report" / "human-eval.html"
    ).read_text()
    result = cli("evaluate", "--report", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "no scores file" in result.stderr


def test_report_states_each_variants_paired_change_over_the_base_with_its_verdict(tmp_path, eval_dir):
    from selma_toolkit.evaluate import read_scores
    from selma_toolkit.evaluate.report import paired_gains

    document = read_scores(eval_dir / "scores.json")
    rows = paired_gains(document, samples=500)
    by_key = {(i["variant"], i["skill"], i["prompt_id"], i["seed"]): i["scores"] for i in document["items"]}
    for row in rows:
        # Independently: the variant's score minus the base's on the same (skill, prompt, seed).
        diffs = [
            scores[row["metric"]] - by_key[("base", skill, pid, seed)][row["metric"]]
            for (variant, skill, pid, seed), scores in by_key.items()
            if variant == row["variant"] and skill == row["skill"] and ("base", skill, pid, seed) in by_key
        ]
        assert row["change"].mean == pytest.approx(float(np.mean(diffs)))
        assert row["change"].low <= row["change"].mean <= row["change"].high
        expected = (
            "helps" if row["change"].low > 0 else "hurts" if row["change"].high < 0 else "not significant at this size"
        )
        assert row["verdict"] == expected
    assert {r["variant"] for r in rows} == set(document["variants"]) - {"base"}
    page = write_report(eval_dir, tmp_path / "report", note="Study numbers: docs/toyworld.md").read_text()
    assert "What this run showed" in page and "Study numbers: docs/toyworld.md" in page
    assert any(verdict in page for verdict in ("helps", "hurts", "not significant at this size"))


def test_what_this_run_showed_lists_each_merge_first_then_each_expert_on_its_own_skill(tmp_path, eval_dir):
    from selma_toolkit.evaluate.report import headline_gains, ordered_gains

    document = read_scores(eval_dir / "scores.json")
    rows = [(r["variant"], r["skill"]) for r in ordered_gains(document, samples=200)]
    kinds = ["merge" if v.startswith("merged:") else "own" if v == f"expert:{s}" else "other" for v, s in rows]
    assert kinds == sorted(kinds, key=["merge", "own", "other"].index) and set(kinds) == {"merge", "own", "other"}
    own_skills = [skill for (_, skill), kind in zip(rows, kinds, strict=True) if kind == "own"]
    assert own_skills[::2] == list(document["skills"])  # in the skills' order, two metrics each
    assert [(r["variant"], r["skill"]) for r in headline_gains(document, samples=200)] == [
        row for row, kind in zip(rows, kinds, strict=True) if kind != "other"
    ]
    page = write_report(eval_dir, tmp_path / "report").read_text()
    table = page.split("What this run showed", 1)[1].split("<h2>", 1)[0]
    shown = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td>", table)
    assert shown == rows


def test_a_tie_for_the_best_mean_marks_no_cell_and_a_unique_best_is_marked(tmp_path, eval_dir):
    from selma_toolkit.evaluate.report import _table

    means = {("a", "m"): 2.0, ("b", "m"): 2.0, ("c", "m"): 1.0, ("a", "k"): 1.0, ("b", "k"): 3.0, ("c", "k"): 1.0}
    stats = {key: {"mean": mean, "low": mean - 1, "high": mean + 1, "n": 4} for key, mean in means.items()}
    rows = _table(["a", "b", "c"], ["m", "k"], lambda row, column: stats[(row, column)], "variant").split("<tr>")[2:]
    marked = [[cell.startswith(' class="best"') for cell in row.split("<td")[2:]] for row in rows]
    assert marked == [[False, False], [False, True], [False, False]]


def test_report_images_show_their_scores_and_charts_fit_the_page_column(tmp_path, eval_dir):
    from PIL import Image

    from selma_toolkit.evaluate.report import COLUMN_INCHES

    document = read_scores(eval_dir / "scores.json")
    # Many variants (as a run with DPO, MoE and several merge methods): the chart would be wider than the page.
    extra = [f"merged:m{k}" for k in range(8)]
    wide = dict(
        document,
        variants=[*document["variants"], *extra],
        aggregate={**document["aggregate"], **{v: document["aggregate"]["merged:selma"] for v in extra}},
        items=[
            *document["items"],
            *[dict(i, variant=v) for v in extra for i in document["items"] if i["variant"] == "merged:selma"],
        ],
    )
    index = write_report(wide, tmp_path / "report", eval_dir=eval_dir)
    for metric in document["scorers"]:
        width, _ = Image.open(index.parent / "plots" / f"{metric}.png").size
        assert width <= COLUMN_INCHES * 100  # the legend included: drawn inside the figure
    page = index.read_text()
    assert "figure img{max-width:100%" in page
    labels = {m: info["label"] for m, info in document["scorers"].items()}
    first = next(i for i in document["items"] if i["variant"] == "base")
    score = " · ".join(f"{labels[m]} {value:.2f}" for m, value in first["scores"].items())
    assert f"<div class='score'>{score}</div>" in page


def test_report_names_the_selected_checkpoint_of_each_expert_from_the_selection(tmp_path, eval_dir):
    from selma_toolkit.evaluate.generate import _lora_notes
    from selma_toolkit.paths import RunPaths

    paths = RunPaths(tmp_path / "run")
    chosen = paths.train_dir("color") / "checkpoints" / "step-4" / "color.safetensors"
    paths.selection.parent.mkdir(parents=True)
    paths.selection.write_text(
        json.dumps(
            {
                "format": "selma-checkpoint-selection/1",
                "skills": {
                    "color": {
                        "metric": "clipscore",
                        "best_step": 4,
                        "expert": chosen.relative_to(paths.root).as_posix(),
                        "sha256": "0" * 64,
                        "checkpoints": [{"step": 2, "mean": 20.5}, {"step": 4, "mean": 21.25}],
                    }
                },
            }
        )
    )
    variants = {
        "base": None,
        "expert:color": chosen,
        "expert:count": paths.expert("count"),
        "merged:selma": paths.merged("selma"),
    }
    notes = _lora_notes(paths, variants)
    assert notes == {
        "expert:color": "the checkpoint of step 4 (skills/color/train/checkpoints/step-4/color.safetensors), the best "
        "by clipscore on the held-out prompts (step 2: 20.5, step 4: 21.25)",
        "expert:count": "experts/count.safetensors (the final expert)",
        "merged:selma": "merged/selma.safetensors",
    }
    page = write_report(eval_dir, tmp_path / "report", loras=notes).read_text()
    shown = page.split("What this run showed", 1)[1].split("<table>", 1)[0]
    assert (
        "<b>expert:color</b>: the checkpoint of step 4 (skills/color/train/checkpoints/step-4/color.safetensors)"
        in shown
    )
