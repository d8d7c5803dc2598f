"""The study's summary, second part (study_report.py has the first): gains with intervals from a
bootstrap over seeds and then items, the judge's agreement with the exact scorer, the base's
guidance curve, and the check of the "faithful enough" rule against every measured variant.

A bootstrap over (seed, prompt) items treats the seeds' replicates as one pool; a variant's gain
can come from one lucky replicate (one expert training that went well) and still look sure. The
bootstrap over seeds then items resamples the replicates first (with replacement), then the
items within each chosen replicate, so the interval also covers how much the gain changes from
one training to the next. With 3 seeds it is wide; a gain that clears 0 under it is what a
variant must show, on fresh seeds, to be shipped.
"""

from __future__ import annotations

import re
from typing import Any

from selma_toolkit.io import atomic_open
from selma_toolkit.toyworld.study_kinds import EXPERT_PREFIX

RESAMPLES = 2000


def seed_item_bootstrap(by_seed: dict[int, list[float]], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over every item and its 95% interval from resampling the seeds
    with replacement, then the items of each chosen seed with replacement (a two-stage bootstrap)."""
    import numpy as np

    groups = [np.asarray(values, dtype=np.float64) for _, values in sorted(by_seed.items()) if values]
    estimate = float(np.concatenate(groups).mean())
    rng = np.random.default_rng(seed)
    means = np.empty(RESAMPLES)
    for r in range(RESAMPLES):
        chosen = rng.integers(0, len(groups), size=len(groups))
        total = count = 0.0
        for g in chosen:
            values = groups[g]
            sample = values[rng.integers(0, len(values), size=len(values))]
            total += sample.sum()
            count += len(values)
        means[r] = total / count
    low, high = np.quantile(means, [0.025, 0.975])
    return estimate, float(low), float(high)


def hierarchical_gains(
    cells: dict[tuple[str, str], dict[tuple[int, Any], float]], kinds: list[str], skills: list[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every kind's paired gain over the base per skill, with the seeds-then-items interval."""
    gains: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in kinds:
        if kind == "base":
            continue
        for skill in skills:
            variant, base = cells.get((kind, skill)), cells.get(("base", skill))
            if variant is None or base is None:
                continue
            by_seed: dict[int, list[float]] = {}
            for key in sorted(set(variant) & set(base)):
                by_seed.setdefault(key[0], []).append(variant[key] - base[key])
            if by_seed:
                mean, low, high = seed_item_bootstrap(by_seed)
                gains.setdefault(kind, {})[skill] = {
                    "mean": mean,
                    "low": low,
                    "high": high,
                    "n": sum(map(len, by_seed.values())),
                    "seeds": len(by_seed),
                }
    return gains


def pooled_agreement(records: dict[str, dict[str, Any]], skills: list[str]) -> dict[str, dict[str, Any]]:
    """Per skill, the judge's ROC AUC for "every question right" on the base's own training images,
    pooled over the seeds (and per seed)."""
    from selma_toolkit.toyworld.study_data import roc_auc

    pooled: dict[str, dict[str, Any]] = {}
    for seed, record in records.items():
        for skill, agreement in (record.get("judge_agreement") or {}).items():
            if skill not in skills:
                continue
            cell = pooled.setdefault(skill, {"judge": [], "right": [], "per_seed": {}})
            cell["judge"] += agreement["judge_scores"]
            cell["right"] += [value == 100.0 for value in agreement["exact_scores"]]
            cell["per_seed"][seed] = agreement["auc"]
    return {
        skill: {
            "auc": roc_auc(cell["judge"], cell["right"]),
            "images": len(cell["right"]),
            "all_right": sum(cell["right"]),
            "per_seed": cell["per_seed"],
        }
        for skill, cell in pooled.items()
    }


def training_margins(records: dict[str, dict[str, Any]], skills: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per data kind and skill: how much more faithful its training images are than the base's own
    image of the same train prompt at the inference guidance (the "selma" kind's image, same seed),
    paired per (seed, prompt), with the seeds-then-items interval: the quantity the rule is about."""
    margins: dict[str, dict[str, dict[str, Any]]] = {}
    kinds = {kind for record in records.values() for kind in record.get("train_item_scores", {})}
    for kind in sorted(kinds - {"selma"}):
        for skill in skills:
            by_seed: dict[int, list[float]] = {}
            for seed, record in records.items():
                scores = record.get("train_item_scores", {})
                own, base = scores.get(kind, {}).get(skill), scores.get("selma", {}).get(skill)
                if own and base:
                    by_seed[int(seed)] = [own[pid] - base[pid] for pid in sorted(set(own) & set(base), key=int)]
            if any(by_seed.values()):
                mean, low, high = seed_item_bootstrap({s: v for s, v in by_seed.items() if v})
                margins.setdefault(kind, {})[skill] = {"mean": mean, "low": low, "high": high}
    return margins


def rule_check(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rule "self-generated data can help only when the training images are more faithful than
    the base at inference" against every data kind measured: per kind and skill its margin, the
    rule's prediction (help possible iff the margin's interval lies above 0) and the expert's
    measured gain (seeds-then-items interval); ``holds`` unless a kind predicted not to help gains
    (interval above 0)."""

    rows = []
    for kind, per_skill in summary.get("training_margins", {}).items():
        for skill, margin in per_skill.items():
            gain = summary.get("gains_seeds_items", {}).get(EXPERT_PREFIX.get(kind, ""), {}).get(skill)
            can_help = margin["low"] > 0
            helped = gain is not None and gain["low"] > 0
            rows.append(
                {
                    "kind": kind,
                    "skill": skill,
                    "margin": margin,
                    "gain": gain,
                    "can_help": can_help,
                    "helped": helped,
                    "holds": can_help or not helped,
                }
            )
    return rows


def base_guidance(kind: str, recipe_guidance: float | None) -> float | None:
    """The guidance of a base variant: ``base`` at the recipe's, ``base-cfg<g>`` at g; None otherwise."""
    if kind == "base":
        return recipe_guidance
    match = re.fullmatch(r"base-cfg([0-9.]+)", kind)
    return float(match.group(1)) if match else None


def guidance_curve(summary: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(guidance, {skill: score stats}) of the base at every guidance drawn, in increasing guidance."""
    rows = [
        (g, summary["scores"][kind])
        for kind in summary["kinds"]
        if (g := base_guidance(kind, summary.get("guidance"))) is not None and kind in summary["scores"]
    ]
    return sorted(rows, key=lambda row: row[0])


def _cell(stats: dict[str, Any] | None, signed: bool = False) -> str:
    if stats is None:
        return "–"
    form = "{:+.1f}" if signed else "{:.1f}"
    return f"{form.format(stats['mean'])} [{form.format(stats['low'])}, {form.format(stats['high'])}]"


def more_markdown(summary: dict[str, Any]) -> list[str]:
    """study.md's sections from this module: seeds-then-items gains, judge agreement, guidance curve."""
    skills = summary["skills"]
    head = ["|---" * (len(skills) + 1) + "|"]
    lines = [
        "",
        "## Gain over the base, bootstrap over seeds then items (the shipping rule's interval)",
        "",
        "| variant | " + " | ".join(skills) + " |",
        *head,
    ]
    for kind, per_skill in summary.get("gains_seeds_items", {}).items():
        lines.append(f"| {kind} | " + " | ".join(_cell(per_skill.get(s), signed=True) for s in skills) + " |")
    agreement = summary.get("judge_agreement") or {}
    if agreement:
        lines += [
            "",
            "## The judge against the exact scorer (base's own training images)",
            "",
            'ROC AUC of the judge\'s score for "every question right" (toyworld score 100), pooled over seeds.',
            "",
            "| skill | AUC | images | all right | AUC per seed |",
            "|---|---|---|---|---|",
        ]
        for skill in skills:
            if skill in agreement:
                cell = agreement[skill]
                auc = "–" if cell["auc"] is None else f"{cell['auc']:.3f}"
                per_seed = ", ".join("–" if v is None else f"{v:.2f}" for v in cell["per_seed"].values())
                lines.append(f"| {skill} | {auc} | {cell['images']} | {cell['all_right']} | {per_seed} |")
    checks = summary.get("rule_check") or []
    if checks:
        lines += [
            "",
            "## The rule against every data kind",
            "",
            "Margin: a kind's training images minus the base's own image of the same train prompt at the "
            "inference guidance (toyworld score, paired). The rule: self-generated data can help only when the "
            "margin's interval lies above 0.",
            "",
            "| data | skill | margin | rule says | expert's gain | rule holds |",
            "|---|---|---|---|---|---|",
        ]
        for row in checks:
            says = "can help" if row["can_help"] else "cannot help"
            lines.append(
                f"| {row['kind']} | {row['skill']} | {_cell(row['margin'], signed=True)} | {says} | "
                f"{_cell(row['gain'], signed=True)} | {'yes' if row['holds'] else 'NO'} |"
            )
    curve = guidance_curve(summary)
    if len(curve) > 1:
        lines += ["", "## The base at each guidance", "", "| guidance | " + " | ".join(skills) + " |", *head]
        lines += [f"| {g:g} | " + " | ".join(_cell(stats.get(s)) for s in skills) + " |" for g, stats in curve]
    return lines


def rule_figure(summary: dict[str, Any], path) -> bool:
    """study-rule.png: left, every expert kind's gain over the base per skill (seeds-then-items
    interval); right, each data kind's training margin against its expert's gain, per skill (the
    rule: a gain needs a margin above 0). False (nothing written) when there are no margins."""
    rows = [row for row in summary.get("rule_check", []) if row["gain"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills = summary["skills"]
    gains = summary.get("gains_seeds_items", {})
    experts = [EXPERT_PREFIX[k] for k in EXPERT_PREFIX if EXPERT_PREFIX[k] in gains]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    width = 0.8 / max(1, len(skills))
    for s, skill in enumerate(skills):
        xs, means, errors = [], [], [[], []]
        for k, kind in enumerate(experts):
            stats = gains[kind].get(skill)
            if stats is not None:
                xs.append(k + (s - (len(skills) - 1) / 2) * width)
                means.append(stats["mean"])
                errors[0].append(stats["mean"] - stats["low"])
                errors[1].append(stats["high"] - stats["mean"])
        left.bar(xs, means, width, yerr=errors, capsize=2, label=skill)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xticks(range(len(experts)), [e.removesuffix("-expert") or "selma" for e in experts], rotation=30)
    left.set_ylabel("gain over the base (toyworld points)")
    left.set_title("experts on their own skill, 95% interval (seeds, then items)", fontsize=9)
    left.legend(fontsize=7)
    markers = dict(zip(skills, "osD^v"))
    for row in rows:
        margin, gain = row["margin"], row["gain"]
        right.errorbar(
            margin["mean"],
            gain["mean"],
            xerr=[[margin["mean"] - margin["low"]], [margin["high"] - margin["mean"]]],
            yerr=[[gain["mean"] - gain["low"]], [gain["high"] - gain["mean"]]],
            fmt=markers.get(row["skill"], "o"),
            capsize=2,
            color="tab:green" if row["helped"] else "tab:gray",
        )
        right.annotate(
            row["kind"], (margin["mean"], gain["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    right.axhline(0, color="black", linewidth=0.8)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel("training margin: training images minus the base at inference (toyworld points)")
    right.set_ylabel("expert's gain (toyworld points)")
    right.set_title("the rule: a gain needs a margin above 0 (green: gain interval above 0)", fontsize=9)
    figure.tight_layout()
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)
    return True
