"""`selma evaluate RUN --before PREVIOUS`: the merged LoRA before a skill was added against after.

*Before* is a previous run folder (its ``merged/<method>.safetensors`` and its skills' held-out
prompts) or a merged LoRA (a file, catalog name or repo id; a file inside a run folder's
``merged/`` brings that run's held-out prompts too). *After* is RUN's ``merged/<method>.safetensors``.

Both variants draw the same prompts: RUN's held-out prompts (its new skills) and the previous
run's held-out prompts of the skills RUN does not train (the old skills), with RUN's generation
settings and paired seeds (evaluate/generate.py), so two images of a prompt differ only by the
LoRA. The after images of RUN's prompts are the run evaluation's own (``eval/images/merged-<method>``).
A skill is *new* when the before merge does not list it, else *old*.

Per skill and scorer: the mean before and after over the (prompt, seed) pairs, and the mean paired
difference (after - before) with its 95% bootstrap interval: *gained* when the interval lies above
0, *lost* when it lies below, *no clear change* otherwise. Written to ``eval/before-after/``:
scores.json (score_variants), comparison.json, comparison.md and report/ (image grids before /
after, and a human-evaluation page of after against before).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.errors import DatasetError, LoraFormatError, RecipeError, Remedy
from selma_toolkit.evaluate.report import write_report
from selma_toolkit.evaluate.scorers import build_scorers
from selma_toolkit.evaluate.scoring import score_variants, variant_folder
from selma_toolkit.evaluate.stats import Interval, bootstrap_interval
from selma_toolkit.io import atomic_write_text, sha256_file
from selma_toolkit.models import detect_architecture
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import load_run_folder

log = logging.getLogger(__name__)

FOLDER = "before-after"
Verdict = Literal["gained", "lost", "no clear change", "too few pairs"]


@dataclass(frozen=True)
class SkillChange:
    """One skill and scorer: means before and after, and the paired change with its interval."""

    skill: str
    kind: Literal["new", "old"]
    metric: str
    before: float
    after: float
    change: Interval
    verdict: Verdict


@dataclass(frozen=True)
class Comparison:
    """What compare_before_after wrote and found."""

    folder: Path
    before: Path
    after: Path
    changes: list[SkillChange]
    report: Path

    def with_verdict(self, verdict: Verdict) -> list[SkillChange]:
        return [c for c in self.changes if c.verdict == verdict]


def compare_before_after(
    run: RunRecipe,
    paths: RunPaths,
    before: str | Path,
    *,
    method: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Comparison:
    """Draw, score and compare the merged LoRA before (``before``) and after (RUN's merge with
    ``method``, default merge.method) on the new and the old skills' held-out prompts."""
    from selma_toolkit.evaluate.generate import EvalJob, draw_eval_images, heldout_prompts

    method = method or run.merge.method
    after = paths.merged(method)
    if not after.is_file():
        raise DatasetError(
            f"{after}: RUN has no {method} merge yet; run `selma run RECIPE` (or `selma evaluate "
            f"{paths.root}`) first, or name a merge method the run makes"
        )
    before_file, previous = _resolve_before(before, method)
    if sha256_file(before_file) == sha256_file(after):
        raise DatasetError(
            f"{before}: is the same LoRA as {after}; give the merged LoRA from before the skill was added"
        )
    old_skills = _check_before(run, before_file, previous)
    scorers = build_scorers(run.evaluate)  # every scorer setting checked before anything is drawn
    new_prompts = heldout_prompts(run, paths)
    old_prompts = {}
    if previous is not None:
        before_run, before_paths = previous
        old_prompts = {
            skill: prompts
            for skill, prompts in heldout_prompts(before_run, before_paths).items()
            if skill not in new_prompts and prompts
        }
    else:
        log.warning(
            "%s is not in a run folder: no held-out prompts of the old skills, so only RUN's skills are "
            "compared; give the previous run folder to compare the old skills too",
            before_file,
        )
    if not any(new_prompts.values()) and not old_prompts:
        raise DatasetError(
            f"{paths.root}: no held-out prompts to compare on (evaluate.prompts_per_skill = "
            f"{run.evaluate.prompts_per_skill}); set it above 0 and run `selma run` again"
        )
    kinds = {skill: "old" if skill in old_skills else "new" for skill in [*new_prompts, *old_prompts]}
    folder = paths.eval_dir / FOLDER
    jobs = [
        EvalJob("before", folder / "images" / "before", before_file, {**new_prompts, **old_prompts}),
        EvalJob("after", paths.eval_dir / "images" / variant_folder(f"merged:{method}"), after, new_prompts),
    ]
    if old_prompts:
        jobs.append(EvalJob("after", folder / "images" / "after", after, old_prompts))
    items = draw_eval_images(run, jobs, progress=progress)
    document = score_variants(
        items, scorers, folder, bootstrap_samples=run.evaluate.bootstrap_samples, batch_size=run.evaluate.batch_size
    )
    changes = paired_changes(document["items"], kinds, list(document["scorers"]), run.evaluate.bootstrap_samples)
    summary = {
        "before": str(before_file),
        "after": str(after),
        "method": method,
        "changes": [asdict(c) for c in changes],
    }
    atomic_write_text(folder / "comparison.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(folder / "comparison.md", comparison_markdown(changes, before_file, after))
    report = write_report(
        folder,
        folder / "report",
        title=f"{run.name}: before and after adding " + ", ".join(s for s, k in kinds.items() if k == "new"),
        prompts_per_skill=run.evaluate.report_prompts_per_skill,
        human_eval_pairs=[["after", "before"]],
    )
    return Comparison(folder, before_file, after, changes, report)


def _resolve_before(before: str | Path, method: str) -> tuple[Path, tuple[RunRecipe, RunPaths] | None]:
    """The before LoRA file and, when it belongs to a run folder, that run's recipe and paths."""
    from selma_toolkit.experts import resolve_expert_file

    folder = Path(before).expanduser()
    if folder.is_dir():
        before_run, before_paths = load_run_folder(folder)
        file = before_paths.merged(method)
        if not file.is_file():
            made = sorted(p.stem for p in (folder / "merged").glob("*.safetensors"))
            raise DatasetError(
                what=f"no merged/{method}.safetensors (merges there: {made or 'none'})",
                where=str(folder),
                remedies=[
                    Remedy.set("method", made[0] if made else "selma", note="compare a method both runs merged with")
                ],
            )
        return file, (before_run, before_paths)
    file = resolve_expert_file(before).path
    root = file.resolve().parent.parent
    if file.resolve().parent.name == "merged" and (root / "recipe.toml").is_file():
        return file, load_run_folder(root)
    return file, None


def _check_before(run: RunRecipe, before_file: Path, previous: tuple[RunRecipe, RunPaths] | None) -> set[str]:
    """Refuse a before LoRA for another base model; return the skills it was merged from."""
    from selma_toolkit.lora import guess_architecture, load_lora
    from selma_toolkit.lora.merge import merge_record

    if previous is not None and (previous[0].base_model, previous[0].revision) != (run.base_model, run.revision):
        raise RecipeError(
            f"{previous[1].root}: was run on base_model {previous[0].base_model!r}, RUN on "
            f"{run.base_model!r}; compare merges made for the same base model"
        )
    lora = load_lora(before_file)
    found, architecture = guess_architecture(lora), detect_architecture(run.base_model, revision=run.revision)
    if found is not None and found != architecture:
        raise LoraFormatError(
            f"{before_file}: is a LoRA for {found}, but RUN's base_model {run.base_model!r} is "
            f"{architecture}; compare merges made for the same base model"
        )
    record = merge_record(lora) or {}
    skills = {entry.get("skill") for entry in record.get("experts", []) if entry.get("skill")}
    return skills | ({s.name for s in previous[0].skills} if previous is not None else set())


def paired_changes(
    items: Sequence[Mapping[str, Any]], kinds: Mapping[str, str], metrics: Sequence[str], samples: int = 1000
) -> list[SkillChange]:
    """Per skill and metric, the paired change after - before over the items (scores.json
    ``items``) that both variants scored for the same (skill, prompt id, seed)."""
    by_key: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for item in items:
        by_key.setdefault((item["skill"], item["prompt_id"], item["seed"]), {})[item["variant"]] = item["scores"]
    changes = []
    for skill, kind in kinds.items():
        for metric in metrics:
            pairs = [
                (v["before"][metric], v["after"][metric])
                for key, v in sorted(by_key.items(), key=lambda kv: str(kv[0]))
                if key[0] == skill
                and "before" in v
                and "after" in v
                and v["before"][metric] is not None
                and v["after"][metric] is not None
            ]
            if not pairs:
                continue
            change = bootstrap_interval([a - b for b, a in pairs], samples=samples)
            verdict: Verdict = (
                "too few pairs"
                if change.n < 2
                else "gained"
                if change.low > 0
                else "lost"
                if change.high < 0
                else "no clear change"
            )
            changes.append(
                SkillChange(
                    skill,
                    kind,
                    metric,
                    sum(b for b, _ in pairs) / len(pairs),  # type: ignore[arg-type]
                    sum(a for _, a in pairs) / len(pairs),
                    change,
                    verdict,
                )
            )
    return changes


def comparison_markdown(changes: Sequence[SkillChange], before: Path, after: Path) -> str:
    """comparison.md: a table of every change and one line each on what was gained and lost."""
    lines = [
        "# Before and after adding the new skill(s)\n",
        f"- before: `{before}`",
        f"- after: `{after}`\n",
        "| skill | kind | metric | before | after | change [95% interval] | n | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c.skill} | {c.kind} | {c.metric} | {c.before:.4g} | {c.after:.4g} | {c.change.mean:+.4g} "
        f"[{c.change.low:+.4g}, {c.change.high:+.4g}] | {c.change.n} | {c.verdict} |"
        for c in changes
    ]
    lines += ["", verdict_line(changes, "gained"), verdict_line(changes, "lost"), ""]
    return "\n".join(lines)


def verdict_line(changes: Sequence[SkillChange], verdict: Literal["gained", "lost"]) -> str:
    """ "Gained: ..." / "Lost: ..." in one sentence (nothing, when no interval lies past 0)."""
    chosen = [f"{c.skill} ({c.kind}) {c.metric} {c.change.mean:+.4g}" for c in changes if c.verdict == verdict]
    if chosen:
        return f"{verdict.capitalize()}: " + "; ".join(chosen) + "."
    direction = "rose" if verdict == "gained" else "fell"
    return f"{verdict.capitalize()}: nothing (no skill's score {direction} with 95% confidence)."
