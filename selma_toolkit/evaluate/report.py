"""The evaluation report: a self-contained folder that works offline (no CDN, no server).

```
report/
  index.html        summary table (variants x metrics, mean and 95% interval), a bar chart per metric,
                    per-skill tables, image grids (base vs experts vs merged, prompt text beside)
  human-eval.html   the human-evaluation page (selma_toolkit.evaluate.human_eval)
  plots/<metric>.png
  images/<variant>/<skill>/<index>-seed<seed>.<ext>   copies of every image the pages show
```
Every path in the pages is relative and points inside the folder, so it can be zipped and moved.
The charts are drawn at the page column's width (and scale down with a narrower window).
"""

from __future__ import annotations

import html
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selma_toolkit.errors import DatasetError
from selma_toolkit.evaluate.human_eval import build_pairs, write_human_eval_page
from selma_toolkit.evaluate.scoring import read_scores, variant_folder, variant_sort_key
from selma_toolkit.evaluate.stats import bootstrap_interval
from selma_toolkit.io import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}.best{font-weight:bold;background:#eef7ee}
.note{color:#555;font-size:.9rem}.ci{color:#777;font-size:.8rem}
.grid td,.grid th{vertical-align:top;text-align:center}.grid img{width:160px;height:auto;display:block;margin:auto}
.prompt{max-width:260px;text-align:left!important;font-size:.9rem}.score{font-size:.75rem;color:#555}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;display:block}.scroll{overflow-x:auto}
#image-check{padding:.5rem;margin:1rem 0;display:none}#image-check.broken{display:block;background:#fdd}
"""

# Tells the reader (and the browser test) when an image failed to load, e.g. after files were moved.
IMAGE_CHECK_JS = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  document.body.setAttribute('data-images-loaded', String(images.length - broken.length));
  document.body.setAttribute('data-images-broken', String(broken.length));
  if (broken.length) {
    var box = document.getElementById('image-check');
    box.className = 'broken';
    box.textContent = broken.length + ' of ' + images.length + ' images failed to load (first: ' +
      broken[0].getAttribute('src') + '). Keep the report folder together with its images/ folder.';
  }
});
"""


# The page column: body max-width 1200 px less 2 x 1rem padding, in inches at the charts' 100 dpi.
COLUMN_INCHES = 11.68


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"


def _cell(stats: Mapping[str, Any] | None, best: bool = False) -> str:
    if stats is None:
        return "<td>–</td>"
    mark = ' class="best"' if best else ""
    return (
        f'<td{mark}>{_fmt(stats["mean"])} <span class="ci">[{_fmt(stats["low"])}, {_fmt(stats["high"])}]'
        f" n={stats['n']}</span></td>"
    )


def _table(rows: Sequence[str], columns: Sequence[str], lookup, header: str) -> str:
    """A table of mean [interval] cells; the highest mean in each column is marked when no other row has it."""
    out = [
        f"<div class='scroll'><table><tr><th>{html.escape(header)}</th>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        + "</tr>"
    ]
    best: dict[str, str | None] = {}
    for column in columns:
        means = {row: lookup(row, column)["mean"] for row in rows if lookup(row, column) is not None}
        top = [row for row, mean in means.items() if mean == max(means.values())] if means else []
        best[column] = top[0] if len(top) == 1 and len(rows) > 1 else None  # a tie marks no cell
    for row in rows:
        cells = "".join(_cell(lookup(row, c), best[c] == row) for c in columns)
        out.append(f"<tr><td>{html.escape(row)}</td>{cells}</tr>")
    return "\n".join(out) + "</table></div>"


def _plot(document: Mapping[str, Any], metric: str, path: Path) -> None:
    """Grouped bars: one group for all prompts and one per skill, one bar per variant, 95% intervals."""
    from matplotlib.figure import (
        Figure,  # the object API: no pyplot, no global backend state
    )

    variants, skills = document["variants"], document["skills"]
    groups = ["all prompts", *skills]
    # At most the page column's width (the browser scales it down further in a narrower window); the
    # constrained layout keeps the legend inside that width, where tight_layout let it stick out.
    width_inches = min(COLUMN_INCHES, max(7.0, 0.4 * len(groups) * max(1, len(variants)) + 4))
    figure = Figure(figsize=(width_inches, 4.0), dpi=100, layout="constrained")
    axes = figure.subplots()
    width = 0.8 / max(1, len(variants))
    for position, variant in enumerate(variants):
        parts = document["aggregate"][variant]
        stats = [parts["overall"].get(metric)] + [parts["skills"].get(skill, {}).get(metric) for skill in skills]
        xs = [g + (position - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        means = [s["mean"] if s else float("nan") for s in stats]
        errors = [[s["mean"] - s["low"] if s else 0 for s in stats], [s["high"] - s["mean"] if s else 0 for s in stats]]
        axes.bar(xs, means, width=width, yerr=errors, capsize=2, label=variant)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_xlim(-0.5, len(groups) - 0.5)  # keep every group in place when a metric has no values for some
    axes.set_ylabel(document["scorers"][metric]["label"])
    axes.set_title(f"{document['scorers'][metric]['label']} (mean, 95% bootstrap interval)")
    figure.legend(fontsize="small", loc="outside right upper")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png")


def copy_image(item: Mapping[str, Any], eval_dir: Path, out_dir: Path) -> str:
    """Copy an item's image into ``out_dir/images/`` (once) and return its path relative to out_dir."""
    source = Path(item["image"])
    source = source if source.is_absolute() else eval_dir / source
    if not source.is_file():
        raise DatasetError(
            f"{source}: image of {item['variant']} / {item['skill']} #{item['index']} listed in "
            "scores.json is missing; rerun `selma evaluate`"
        )
    relative = (
        Path("images")
        / variant_folder(item["variant"])
        / item["skill"]
        / f"{item['index']:04d}-seed{item['seed']}{source.suffix}"
    )
    target = out_dir / relative
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return relative.as_posix()


def _grids(document: Mapping[str, Any], eval_dir: Path, out_dir: Path, prompts_per_skill: int) -> str:
    """Per skill: the first prompts (lowest index, first seed) with every variant's image side by side."""
    variants = document["variants"]
    by_key = {(i["variant"], i["skill"], i["index"]): i for i in document["items"]}
    sections = []
    for skill in document["skills"]:
        indices = sorted({i["index"] for i in document["items"] if i["skill"] == skill})[:prompts_per_skill]
        if not indices:
            continue
        shown = [v for v in variants if any((v, skill, n) in by_key for n in indices)]
        rows = [
            "<div class='scroll'><table class='grid'><tr><th>prompt</th>"
            + "".join(f"<th>{html.escape(v)}</th>" for v in shown)
            + "</tr>"
        ]
        for index in indices:
            prompt = next(by_key[(v, skill, index)]["prompt"] for v in shown if (v, skill, index) in by_key)
            cells = []
            for variant in shown:
                item = by_key.get((variant, skill, index))
                if item is None:
                    cells.append("<td>–</td>")
                    continue
                src = copy_image(item, eval_dir, out_dir)
                title = ", ".join(f"{k} {_fmt(v)}" for k, v in item["scores"].items() if v is not None)
                scores = " · ".join(
                    f"{document['scorers'][k]['label']} {'-' if v is None else _fmt(v)}"
                    for k, v in item["scores"].items()
                    if k in document["scorers"]
                )
                cells.append(
                    f"<td><img src='{html.escape(src)}' alt='{html.escape(variant)}' "
                    f"title='{html.escape(title)}' loading='eager'>"
                    f"<div class='score'>{html.escape(scores)}</div></td>"
                )
            rows.append(f"<tr><td class='prompt'>{html.escape(prompt)}</td>{''.join(cells)}</tr>")
        sections.append(f"<h3>{html.escape(skill)}</h3>" + "\n".join(rows) + "</table></div>")
    return "\n".join(sections)


def paired_gains(document: Mapping[str, Any], baseline: str = "base", samples: int = 2000) -> list[dict[str, Any]]:
    """Per variant, skill and metric: the mean paired change over ``baseline`` on the items both
    scored for the same (skill, prompt id, seed), its 95% bootstrap interval and a verdict:
    "helps" (interval above 0), "hurts" (below 0) or "not significant at this size"."""
    by_key: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for item in document["items"]:
        by_key.setdefault((item["skill"], item["prompt_id"], item["seed"]), {})[item["variant"]] = item["scores"]
    rows = []
    for variant in document["variants"]:
        if variant == baseline:
            continue
        for skill in document["skills"]:
            for metric in document["scorers"]:
                diffs = [
                    v[variant][metric] - v[baseline][metric]
                    for key, v in sorted(by_key.items(), key=lambda kv: str(kv[0]))
                    if key[0] == skill
                    and variant in v
                    and baseline in v
                    and v[variant][metric] is not None
                    and v[baseline][metric] is not None
                ]
                if len(diffs) < 2:
                    continue
                change = bootstrap_interval(diffs, samples=samples)
                verdict = "helps" if change.low > 0 else "hurts" if change.high < 0 else "not significant at this size"
                rows.append(
                    {"variant": variant, "skill": skill, "metric": metric, "change": change, "verdict": verdict}
                )
    return rows


def ordered_gains(document: Mapping[str, Any], samples: int = 2000) -> list[dict[str, Any]]:
    """:func:`paired_gains` in the order a reader asks about them: each merge on every skill first, then
    each expert on its own skill, then the rest (experts on other skills, the other baselines)."""
    skills = list(document["skills"])

    def rank(row: Mapping[str, Any]) -> int:
        if row["variant"].startswith("merged:"):
            return 0
        return 1 if row["variant"] == f"expert:{row['skill']}" else 2

    rows = paired_gains(document, samples=samples)
    return sorted(rows, key=lambda row: (rank(row), skills.index(row["skill"]) if rank(row) == 1 else 0))


def headline_gains(document: Mapping[str, Any], samples: int = 2000) -> list[dict[str, Any]]:
    """The rows of :func:`ordered_gains` that answer "did it help?": the merges, and each expert on its own skill."""
    return [
        row
        for row in ordered_gains(document, samples)
        if row["variant"].startswith("merged:") or row["variant"] == f"expert:{row['skill']}"
    ]


def gain_line(row: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """One paired change as a line of text: ``merged:selma on count, CLIPScore: +1.2 [+0.3, +2.1] helps``."""
    change = row["change"]
    return (
        f"{row['variant']} on {row['skill']}, {labels[row['metric']]}: {change.mean:+.3g} "
        f"[{change.low:+.3g}, {change.high:+.3g}] {row['verdict']}"
    )


def _paired_section(document: Mapping[str, Any]) -> str:
    rows = ordered_gains(document)
    if not rows:
        return "<p class='note'>No variant shares prompts and seeds with the base, so no paired change is shown.</p>"
    labels = {m: info["label"] for m, info in document["scorers"].items()}
    body = "".join(
        f"<tr><td>{html.escape(r['variant'])}</td><td>{html.escape(r['skill'])}</td><td>{html.escape(labels[r['metric']])}</td>"
        f"<td>{r['change'].mean:+.3g} <span class='ci'>[{r['change'].low:+.3g}, {r['change'].high:+.3g}]</span></td>"
        f"<td>{r['change'].n}</td><td>{html.escape(r['verdict'])}</td></tr>"
        for r in rows
    )
    return (
        "<p class='note'>Each variant minus the base on the same prompts and seeds (the same initial noise), "
        "with its 95% bootstrap interval: <i>helps</i> when the interval lies above 0, <i>hurts</i> when below, "
        "else <i>not significant at this size</i> (more prompts or seeds would tell). The merges come first, "
        "then each expert on its own skill, then the rest.</p>"
        "<div class='scroll'><table><tr><th>variant</th><th>skill</th><th>metric</th><th>change vs base</th>"
        f"<th>n</th><th>verdict</th></tr>{body}</table></div>"
    )


def _lora_list(loras: Mapping[str, str], variants: Sequence[str]) -> str:
    shown = [v for v in variants if v in loras]
    if not shown:
        return ""
    items = "".join(f"<li><b>{html.escape(v)}</b>: {html.escape(loras[v])}</li>" for v in shown)
    return f"<p class='note'>The LoRAs evaluated:</p><ul class='note loras'>{items}</ul>"


def write_report(
    scores: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    eval_dir: str | Path | None = None,
    title: str = "SELMA evaluation",
    prompts_per_skill: int = 4,
    human_eval_pairs: Sequence[Sequence[str]] | None = None,
    max_pairs: int = 200,
    seed: int = 0,
    note: str = "",
    loras: Mapping[str, str] | None = None,
) -> Path:
    """Write the report folder from scores.json (a path, its folder, or the loaded document).

    ``eval_dir``: where relative image paths in the scores start (default: the folder of
    scores.json). ``human_eval_pairs``: [variant, baseline] pairs for the human-evaluation page;
    None = the first merged variant against base. ``note``: a paragraph of plain text shown under
    "What this run showed" (the recipe's ``evaluate.report_note``). ``loras``: what each variant's
    LoRA is (``{"expert:count": "checkpoint step 4 (...)"}``), listed there too. Returns the path of
    index.html.
    """
    if isinstance(scores, Mapping):
        document = scores
        if eval_dir is None:
            raise ValueError("write_report: give eval_dir when passing a loaded scores document")
    else:
        path = Path(scores)
        document = read_scores(path)
        eval_dir = eval_dir or (path if path.is_dir() else path.parent)
    eval_dir, out_dir = Path(eval_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = dict(document, variants=sorted(document["variants"], key=variant_sort_key))
    metrics = list(document["scorers"])
    aggregate = document["aggregate"]

    plots = []
    for metric in metrics:
        _plot(document, metric, out_dir / "plots" / f"{metric}.png")
        plots.append(f"<figure><img src='plots/{html.escape(metric)}.png' alt='{html.escape(metric)} chart'></figure>")
    labels = [document["scorers"][m]["label"] for m in metrics]
    summary = _table(
        document["variants"], labels, lambda v, label: aggregate[v]["overall"][metrics[labels.index(label)]], "variant"
    )
    per_skill = "".join(
        f"<h3>{html.escape(document['scorers'][m]['label'])}</h3>"
        + _table(
            document["variants"],
            document["skills"],
            lambda v, s, m=m: aggregate[v]["skills"].get(s, {}).get(m),
            "variant",
        )
        for m in metrics
    )
    notes = "".join(
        f"<li><b>{html.escape(info['label'])}</b> ({html.escape(info['model'])}): {html.escape(info['description'])}</li>"
        for info in document["scorers"].values()
    )
    pairs = build_pairs(document, human_eval_pairs, max_pairs=max_pairs, seed=seed)
    for pair in pairs:
        for side in ("left", "right"):
            pair[side]["src"] = copy_image(pair[side].pop("item"), eval_dir, out_dir)
    if pairs:
        write_human_eval_page(pairs, out_dir / "human-eval.html", title=f"{title}: human evaluation")
        human = (
            f"<p><a href='human-eval.html'>Human evaluation</a>: {len(pairs)} image pairs in random left/right order; "
            "export the answers and count them with <code>selma evaluate --tally ANSWERS.json</code>.</p>"
        )
    else:
        human = "<p class='note'>No human-evaluation page: no two variants share prompts to compare.</p>"
    n_images = len(document["items"])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div id="image-check"></div>
<p class="note">{n_images} images, {len(document["variants"])} variants, {len(document["skills"])} skills.
Cells show the mean and its 95% bootstrap interval over images; the best mean per column is marked (no cell
when several share it).</p>
<h2>What this run showed</h2>
{_lora_list(loras or {}, document["variants"])}
{_paired_section(document) if "base" in document["variants"] else ""}
{f"<p>{html.escape(note)}</p>" if note else ""}
<h2>Summary</h2>
{summary}
<ul class="note">{notes}</ul>
<h2>Charts</h2>
{"".join(plots)}
<h2>Per skill</h2>
{per_skill}
<h2>Images</h2>
{_grids(document, eval_dir, out_dir, prompts_per_skill)}
<h2>Human evaluation</h2>
{human}
<script>{IMAGE_CHECK_JS}</script>
</body></html>
"""
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    logger.info("wrote %s", index)
    return index
