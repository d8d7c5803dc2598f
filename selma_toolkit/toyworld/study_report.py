"""The study's summary over seeds: scores, gains over the base, what the merge keeps, the targets.

Reads each finished replicate's ``seed-<s>/eval/scores.json`` and writes, in the study folder:

* ``study.json``  every number below (format ``selma-toyworld-study/1``);
* ``study.md``    the tables; ``study.png`` a bar chart (mean and 95% interval per skill and variant).

Rows are variant kinds: ``base``, ``expert`` (each skill's SELMA expert on its own skill),
``gt-expert``, ``filtered-expert``, ``joint`` (one LoRA on the mixture) and ``merged:<method>``;
with the Table 4 kinds, ``dpo-expert``, ``dpo`` (the DPO experts merged) and ``moe`` (MoE-LoRA),
each also compared with every merge, paired (``table4_vs_merged``).
Every image is paired: the same prompt and seed (hence the same initial noise) in every variant,
so a gain is the mean over (seed, prompt) of ``score(variant) - score(base)``. Intervals are 95%
percentile-bootstrap intervals over those (seed, prompt) items (2,000 resamples, seeded); they
cover prompt and sampling noise, and, pooled over the seeds, part of the training noise. The
per-seed means are listed too, so the spread between replicates can be seen. Retention is the
merged LoRA's gain divided by the expert's gain on the same items, bootstrapped as a ratio
(resamples where the expert gains nothing are left out; undefined unless the expert's own gain
interval lies above 0: a share of a gain that may be 0 is noise).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selma_toolkit.io import atomic_open, atomic_write_text
from selma_toolkit.toyworld.study_kinds import ALL_KINDS, BASE_LOW_GUIDANCE
from selma_toolkit.toyworld.study_stats import (
    base_guidance,
    hierarchical_gains,
    more_markdown,
    pooled_agreement,
    rule_check,
    rule_figure,
    training_margins,
)

log = logging.getLogger(__name__)

STUDY_FORMAT = "selma-toyworld-study/1"
METRIC = "toyworld"
RESAMPLES = 2000
EXPERT_KINDS = tuple(prefix for prefix, _ in ALL_KINDS.values())
# Targets of the issue (the paper's claims), stated before the study ran and checked as measured (never assumed).
TARGET_BASE = (25.0, 60.0)
TARGET_GAIN = 5.0
TARGET_RETENTION = 0.8
TARGET_GT_GAP = 3.0  # "SELMA data within a few points of ground-truth data"
TABLE4_KINDS = ("moe", "dpo")  # variants of the paper's Table 4 baselines, compared with each merge


def _kind(variant: str) -> tuple[str, str | None]:
    """("expert", "toy-count") for "expert:toy-count"; ("merged:selma", None) for merged LoRAs."""
    prefix, _, rest = variant.partition(":")
    return (prefix, rest) if prefix in EXPERT_KINDS and rest else (variant, None)


def collect_items(out: Path) -> tuple[list[int], dict[tuple[str, str], dict[tuple[int, Any], float]]]:
    """(seeds found, {(kind, skill): {(seed, prompt_id): score}}) over every finished replicate;
    experts only on their own skill."""
    seeds, cells = [], {}
    for folder in sorted(out.glob("seed-*"), key=lambda p: int(p.name.split("-", 1)[1])):
        scores_path = folder / "eval" / "scores.json"
        if not (folder / "replicate.json").is_file() or not scores_path.is_file():
            continue
        seed = int(folder.name.split("-", 1)[1])
        seeds.append(seed)
        for item in json.loads(scores_path.read_text())["items"]:
            kind, own = _kind(item["variant"])
            value = item["scores"].get(METRIC)
            if value is None or (own is not None and own != item["skill"]):
                continue
            cells.setdefault((kind, item["skill"]), {})[(seed, item["prompt_id"])] = float(value)
    return seeds, cells


def _bootstrap(values: Sequence[Sequence[float]], statistic, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap over items; ``values`` are aligned columns."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    estimate = float(statistic(data))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, data.shape[1], size=(RESAMPLES, data.shape[1]))
    stats = np.array([statistic(data[:, idx]) for idx in draws])
    stats = stats[np.isfinite(stats)]
    low, high = np.quantile(stats, [0.025, 0.975]) if stats.size else (float("nan"), float("nan"))
    return estimate, float(low), float(high)


def _mean_row(column) -> float:
    return column[0].mean()


def _diff(column) -> float:
    return (column[0] - column[1]).mean()


def _ratio(column) -> float:
    import numpy as np

    expert_gain = (column[1] - column[0]).mean()
    return float((column[2] - column[0]).mean() / expert_gain) if expert_gain > 0 else np.nan


def summarise(out: Path, skills: list[str]) -> dict[str, Any]:
    """Every number of the study from the replicates in ``out`` (see the module docstring)."""
    seeds, cells = collect_items(out)
    kinds = list(dict.fromkeys(kind for kind, _ in cells))
    guided = sorted((k for k in kinds if k.startswith("base-cfg")), key=lambda k: base_guidance(k, None) or 0.0)
    order = ["base", *guided, *EXPERT_KINDS, "joint"]
    kinds = [k for k in order if k in kinds] + sorted(k for k in kinds if k not in order)

    def aligned(*pairs: tuple[str, str]) -> list[list[float]] | None:
        maps = [cells.get(pair) for pair in pairs]
        if any(m is None for m in maps):
            return None
        keys = sorted(set.intersection(*(set(m) for m in maps)))
        return [[m[k] for k in keys] for m in maps] if keys else None

    scores: dict[str, dict[str, Any]] = {}
    gains: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        for skill in skills:
            column = aligned((kind, skill))
            if column is None:
                continue
            mean, low, high = _bootstrap(column, _mean_row)
            per_seed = {
                str(s): round(
                    sum(v for (sd, _), v in cells[(kind, skill)].items() if sd == s)
                    / max(1, sum(1 for sd, _ in cells[(kind, skill)] if sd == s)),
                    2,
                )
                for s in seeds
                if any(sd == s for sd, _ in cells[(kind, skill)])
            }
            scores.setdefault(kind, {})[skill] = {
                "mean": mean,
                "low": low,
                "high": high,
                "n": len(column[0]),
                "per_seed": per_seed,
            }
            paired = aligned((kind, skill), ("base", skill)) if kind != "base" else None
            if paired is not None:
                diff, low, high = _bootstrap(paired, _diff)
                gains.setdefault(kind, {})[skill] = {"mean": diff, "low": low, "high": high, "n": len(paired[0])}
    retention: dict[str, dict[str, Any]] = {}
    versus_joint: dict[str, dict[str, Any]] = {}
    for kind in (k for k in kinds if k.startswith("merged:")):
        for skill in skills:
            triple = aligned(("base", skill), ("expert", skill), (kind, skill))
            if triple is not None:
                ratio, low, high = _bootstrap(triple, _ratio)
                # No share of a gain that is not there: the ratio is undefined (None) unless the expert's
                # gain is significant (its interval above 0); a ratio over a gain near 0 is noise.
                expert_gain = gains.get("expert", {}).get(skill)
                defined = math.isfinite(ratio) and expert_gain is not None and expert_gain["low"] > 0
                retention.setdefault(kind, {})[skill] = {
                    "ratio": ratio if defined else None,
                    "low": low if defined else None,
                    "high": high if defined else None,
                }
            pair = aligned((kind, skill), ("joint", skill))
            if pair is not None:
                diff, low, high = _bootstrap(pair, _diff)
                versus_joint.setdefault(kind, {})[skill] = {"mean": diff, "low": low, "high": high}
    # The paper's Table 4 baselines (MoE-LoRA, the merged DPO experts) against each merge, paired.
    table4: dict[str, dict[str, Any]] = {}
    for kind in (k for k in kinds if k in TABLE4_KINDS):
        for merged in (k for k in kinds if k.startswith("merged:")):
            for skill in skills:
                pair = aligned((kind, skill), (merged, skill))
                if pair is not None:
                    diff, low, high = _bootstrap(pair, _diff)
                    table4.setdefault(f"{kind} - {merged}", {})[skill] = {
                        "mean": diff,
                        "low": low,
                        "high": high,
                        "n": len(pair[0]),
                    }
    versus_gt: dict[str, Any] = {}
    for skill in skills:
        pair = aligned(("expert", skill), ("gt-expert", skill))
        if pair is not None:
            diff, low, high = _bootstrap(pair, _diff)
            versus_gt[skill] = {"mean": diff, "low": low, "high": high}
    records = _replicates(out, seeds)
    prompt_sets = sorted({str(r.get("prompt_set", "heldout")) for r in records.values()})
    guidances = {r.get("guidance") for r in records.values()}
    summary = {
        "format": STUDY_FORMAT,
        "metric": METRIC,
        "seeds": seeds,
        "skills": skills,
        "kinds": kinds,
        "base_models": sorted({str(r.get("base_model")) for r in records.values()}),
        "prompt_set": "+".join(prompt_sets),
        "guidance": guidances.pop() if len(guidances) == 1 else None,
        "gains_seeds_items": hierarchical_gains(cells, kinds, skills),
        "judge_agreement": pooled_agreement(records, skills),
        "scores": scores,
        "gains": gains,
        "retention": retention,
        "merged_vs_joint": versus_joint,
        "table4_vs_merged": table4,
        "selma_vs_gt": versus_gt,
        "train_images": {seed: r["train_images"] for seed, r in records.items()},
        "train_image_scores": _train_image_scores(records, skills),
        "training_margins": training_margins(records, skills),
    }
    summary["rule_check"] = rule_check(summary)
    summary["targets"] = targets(summary)
    summary["findings"] = findings(summary)
    return summary


def _replicates(out: Path, seeds: list[int]) -> dict[str, dict[str, Any]]:
    return {str(s): json.loads((out / f"seed-{s}" / "replicate.json").read_text()) for s in seeds}


def _train_image_scores(records: dict[str, dict[str, Any]], skills: list[str]) -> dict[str, dict[str, float]]:
    """Mean toyworld score of each kind's training images per skill, over the seeds: how well the
    data an expert learns from shows its prompts (the mechanism behind a gain or a loss)."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for record in records.values():
        for kind, per_skill in record.get("train_image_scores", {}).items():
            for skill, value in per_skill.items():
                pooled.setdefault(kind, {}).setdefault(skill, []).append(value)
    return {
        kind: {s: round(sum(v) / len(v), 2) for s, v in per_skill.items() if s in skills}
        for kind, per_skill in pooled.items()
    }


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's hoped-for results, each with the measured value and whether it was met."""
    rows = []
    for skill in summary["skills"]:
        base = summary["scores"].get("base", {}).get(skill)
        if base:
            rows.append(
                {
                    "target": f"base on {skill} in {TARGET_BASE[0]:.0f}-{TARGET_BASE[1]:.0f}",
                    "measured": f"{base['mean']:.1f}",
                    "met": TARGET_BASE[0] <= base["mean"] <= TARGET_BASE[1],
                }
            )
        unguided = summary["gains"].get(BASE_LOW_GUIDANCE, {}).get(skill)
        if unguided:
            rows.append(
                {
                    "target": f"base on {skill} clearly worse at guidance 1 than at the recipe's guidance",
                    "measured": f"{unguided['mean']:+.1f} [{unguided['low']:+.1f}, {unguided['high']:+.1f}]",
                    "met": unguided["high"] < 0,
                }
            )
        gain = summary["gains"].get("expert", {}).get(skill)
        if gain:
            rows.append(
                {
                    "target": f"SELMA expert gain on {skill} >= +{TARGET_GAIN:.0f}, interval above 0",
                    "measured": f"{gain['mean']:+.1f} [{gain['low']:+.1f}, {gain['high']:+.1f}]",
                    "met": gain["mean"] >= TARGET_GAIN and gain["low"] > 0,
                }
            )
        for kind, per_skill in summary["retention"].items():
            kept = per_skill.get(skill)
            if kept:
                rows.append(
                    {
                        "target": f"{kind} keeps >= {TARGET_RETENTION:.0%} of the expert's gain on {skill}",
                        "measured": _share(kept),
                        "met": kept["ratio"] is not None and kept["ratio"] >= TARGET_RETENTION,
                    }
                )
        for kind, per_skill in summary["merged_vs_joint"].items():
            versus = per_skill.get(skill)
            if versus:
                rows.append(
                    {
                        "target": f"{kind} beats the mixture LoRA on {skill}",
                        "measured": f"{versus['mean']:+.1f} [{versus['low']:+.1f}, {versus['high']:+.1f}]",
                        "met": versus["mean"] > 0 and versus["low"] > 0,
                    }
                )
        versus_gt = summary.get("selma_vs_gt", {}).get(skill)
        if versus_gt:
            rows.append(
                {
                    "target": f"SELMA expert within {TARGET_GT_GAP:.0f} points of the ground-truth expert on {skill}",
                    "measured": f"{versus_gt['mean']:+.1f} [{versus_gt['low']:+.1f}, {versus_gt['high']:+.1f}]",
                    "met": versus_gt["mean"] >= -TARGET_GT_GAP,
                }
            )
    return rows


def _verdict(gain: dict[str, Any]) -> str:
    if gain["low"] > 0:
        return "helps"
    if gain["high"] < 0:
        return "hurts"
    return "changes nothing detectable"


def findings(summary: dict[str, Any]) -> list[str]:
    """Plain sentences, per skill, from the paired gains: does the SELMA expert help, and which
    variants (if any) beat the base with an interval above zero. Written from the numbers, so the
    report says so when self-generated data does not help, and shows what does."""
    lines = []
    for skill in summary["skills"]:
        gain = summary["gains"].get("expert", {}).get(skill)
        if gain is None:
            continue
        sentence = f"{skill}: the SELMA expert (self-generated images) {_verdict(gain)} ({_cell(gain, signed=True)})"
        helping = sorted(
            (
                (per_skill[skill]["mean"], kind)
                for kind, per_skill in summary["gains"].items()
                if skill in per_skill and per_skill[skill]["low"] > 0
            ),
            reverse=True,
        )
        if helping:
            sentence += "; above the base: " + ", ".join(f"{kind} {mean:+.1f}" for mean, kind in helping)
        else:
            best_mean, best_kind = max(
                (per_skill[skill]["mean"], kind) for kind, per_skill in summary["gains"].items() if skill in per_skill
            )
            sentence += f"; no variant beats the base (closest: {best_kind} {best_mean:+.1f})"
        lines.append(sentence + ".")
    return lines


def _share(kept: dict[str, Any]) -> str:
    if kept["ratio"] is None:
        return "undefined (no significant expert gain)"
    return f"{kept['ratio']:.0%} [{kept['low']:.0%}, {kept['high']:.0%}]"


def _cell(stats: dict[str, Any] | None, signed: bool = False) -> str:
    if stats is None:
        return "–"
    form = "{:+.1f}" if signed else "{:.1f}"
    return f"{form.format(stats['mean'])} [{form.format(stats['low'])}, {form.format(stats['high'])}]"


def markdown(summary: dict[str, Any], title: str) -> str:
    """study.md: scores, gains, retention, targets, data sizes."""
    skills = summary["skills"]
    bases = ", ".join(summary.get("base_models", [])) or "?"
    where = {"heldout": "held-out prompts", "dev": "development prompts (neither trained on nor held out)"}.get(
        summary.get("prompt_set", "heldout"), summary.get("prompt_set")
    )
    lines = [
        f"# {title}",
        "",
        f"Base model: {bases}. Metric: toyworld score (0-100, share of DSG-style questions right). Seeds: "
        f"{', '.join(map(str, summary['seeds']))}; n = (seed, prompt) items per cell. Brackets: 95% bootstrap interval.",
        "",
        "## Findings",
        "",
        *(f"* {line}" for line in findings(summary)),
        "",
        f"## Scores on {where} (experts on their own skill)",
        "",
        "| variant | " + " | ".join(skills) + " |",
        "|---" * (len(skills) + 1) + "|",
    ]
    for kind in summary["kinds"]:
        lines.append(f"| {kind} | " + " | ".join(_cell(summary["scores"].get(kind, {}).get(s)) for s in skills) + " |")
    lines += ["", "Per-seed means:", "", "| variant | " + " | ".join(skills) + " |", "|---" * (len(skills) + 1) + "|"]
    for kind in summary["kinds"]:
        cells = [
            ", ".join(f"{v:.1f}" for v in summary["scores"].get(kind, {}).get(s, {}).get("per_seed", {}).values())
            or "–"
            for s in skills
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Gain over the base (paired; bootstrap over (seed, prompt) items)",
        "",
        "| variant | " + " | ".join(skills) + " |",
        "|---" * (len(skills) + 1) + "|",
    ]
    for kind, per_skill in summary["gains"].items():
        lines.append(f"| {kind} | " + " | ".join(_cell(per_skill.get(s), signed=True) for s in skills) + " |")
    lines += more_markdown(summary)
    if summary["retention"]:
        lines += [
            "",
            "## Share of the SELMA expert's gain kept by the merge",
            "",
            "| merge | " + " | ".join(skills) + " |",
            "|---" * (len(skills) + 1) + "|",
        ]
        for kind, per_skill in summary["retention"].items():
            lines.append(
                f"| {kind} | " + " | ".join(_share(r) if (r := per_skill.get(s)) else "–" for s in skills) + " |"
            )
    if summary.get("table4_vs_merged"):
        lines += [
            "",
            "## Table 4 baselines minus the merged experts (paired)",
            "",
            "| comparison | " + " | ".join(skills) + " |",
            "|---" * (len(skills) + 1) + "|",
        ]
        for name, per_skill in summary["table4_vs_merged"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(per_skill.get(s), signed=True) for s in skills) + " |")
    lines += ["", "## Targets (as measured)", "", "| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {row['target']} | {row['measured']} | {'yes' if row['met'] else 'no'} |" for row in summary["targets"]
    ]
    if summary.get("train_image_scores"):
        lines += [
            "",
            "## How well the training images show their prompts (mean toyworld score)",
            "",
            "| data | " + " | ".join(skills) + " |",
            "|---" * (len(skills) + 1) + "|",
        ]
        for kind, per_skill in summary["train_image_scores"].items():
            lines.append(
                f"| {kind} | " + " | ".join(f"{per_skill[s]:.1f}" if s in per_skill else "–" for s in skills) + " |"
            )
    lines += [
        "",
        "## Training images per expert",
        "",
        "| seed | data | " + " | ".join(skills) + " |",
        "|---" * (len(skills) + 2) + "|",
    ]
    for seed, kinds in summary["train_images"].items():
        for kind, counts in kinds.items():
            lines.append(f"| {seed} | {kind} | " + " | ".join(str(counts.get(s, "–")) for s in skills) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, Any], path: Path) -> None:
    """study.png: per skill, one bar per variant kind (mean, 95% interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills, kinds = summary["skills"], summary["kinds"]
    figure, axis = plt.subplots(figsize=(2.2 + 1.1 * len(skills) * len(kinds) / 3, 4), dpi=110)
    width = 0.8 / max(1, len(kinds))
    # matplotlib's default cycle repeats after 10 colours; a study has more variants than that.
    palette = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    for k, kind in enumerate(kinds):
        means, errors, xs = [], [[], []], []
        for s, skill in enumerate(skills):
            stats = summary["scores"].get(kind, {}).get(skill)
            if stats is None:
                continue
            xs.append(s + (k - (len(kinds) - 1) / 2) * width)
            means.append(stats["mean"])
            errors[0].append(stats["mean"] - stats["low"])
            errors[1].append(stats["high"] - stats["mean"])
        axis.bar(xs, means, width, yerr=errors, capsize=2, label=kind, color=palette(k % palette.N))
    axis.set_xticks(range(len(skills)), skills)
    axis.set_ylabel("toyworld score (0-100)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=7, ncol=2)
    axis.set_title(f"held-out prompts, seeds {', '.join(map(str, summary['seeds']))}")
    figure.tight_layout()
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def write_study_report(out: Path, run) -> Path:
    """Write study.json, study.md, study.png and study-rule.png from the finished replicates; return study.md."""
    summary = summarise(out, [s.name for s in run.skills])
    atomic_write_text(out / "study.json", json.dumps(summary, indent=1) + "\n")
    bar_chart(summary, out / "study.png")
    rule_figure(summary, out / "study-rule.png")
    path = out / "study.md"
    atomic_write_text(path, markdown(summary, f"Shapes-world study: {run.name}"))
    log.info("study summary: %s", path)
    return path
