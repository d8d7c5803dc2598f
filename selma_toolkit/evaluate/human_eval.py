"""The human-evaluation page: image pairs in random left/right order, win/tie/lose buttons,
progress, and an export of the answers as JSON (counted by ``selma evaluate --tally``).

The paper's study showed 200 DSG prompts, each as a pair (SELMA vs base) in random order, and
reported win / tie / lose. Here each pair compares a ``variant`` with a ``baseline``; the side each
one is on is drawn (seeded) when the page is written and stored in the page, so the export says
which variant was on which side. Answers are kept in the browser's localStorage, so a reload
continues where the rater stopped. Exported file::

    {"format": "selma-human-eval/1", "study": "...", "answers": [
      {"pair": id, "variant": v, "baseline": b, "skill": s, "prompt": p,
       "left": v|b, "right": b|v, "choice": "left"|"right"|"tie"}, ...]}
"""

from __future__ import annotations

import hashlib
import html
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selma_toolkit.errors import DatasetError
from selma_toolkit.io import atomic_write_text

ANSWERS_FORMAT = "selma-human-eval/1"


def build_pairs(
    document: Mapping[str, Any], pairs: Sequence[Sequence[str]] | None, *, max_pairs: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    """Image pairs for the page: for each [variant, baseline], the items both have (same skill,
    prompt index and seed), at most ``max_pairs`` of them (a seeded sample), sides drawn at random.

    ``pairs`` None: the merged LoRA (``merged:selma``, else the first ``merged:*``) against ``base``
    when both exist, else none.
    """
    variants = list(document["variants"])
    if pairs is None:
        merged = sorted((v for v in variants if v.startswith("merged:")), key=lambda v: v != "merged:selma")
        pairs = [[merged[0], "base"]] if merged and "base" in variants else []
    rng = random.Random(seed)
    by_key: dict[tuple, dict[str, Any]] = {}
    for item in document["items"]:
        by_key[(item["variant"], item["skill"], item["index"], item["seed"])] = item
    out: list[dict[str, Any]] = []
    for variant, baseline in pairs:
        missing = [v for v in (variant, baseline) if v not in variants]
        if missing:
            raise DatasetError(
                f"human-evaluation pair [{variant!r}, {baseline!r}]: no variant {missing[0]!r} in the "
                f"scores; variants are {variants}"
            )
        shared = sorted(key[1:] for key in by_key if key[0] == variant and (baseline, *key[1:]) in by_key)
        if len(shared) > max_pairs:
            shared = sorted(rng.sample(shared, max_pairs))
        for skill, index, image_seed in shared:
            sides = [
                (variant, by_key[(variant, skill, index, image_seed)]),
                (baseline, by_key[(baseline, skill, index, image_seed)]),
            ]
            if rng.random() < 0.5:
                sides.reverse()
            out.append(
                {
                    "id": f"{variant}|{baseline}|{skill}|{index}|{image_seed}",
                    "variant": variant,
                    "baseline": baseline,
                    "skill": skill,
                    "prompt": sides[0][1]["prompt"],
                    "left": {"variant": sides[0][0], "item": sides[0][1]},
                    "right": {"variant": sides[1][0], "item": sides[1][1]},
                }
            )
    return out


PAGE_JS = r"""
(function () {
  var pairs = JSON.parse(document.getElementById('pairs').textContent);
  var study = document.body.getAttribute('data-study');
  var key = 'selma-human-eval:' + study;
  var answers = {};
  try { answers = JSON.parse(localStorage.getItem(key) || '{}'); } catch (e) { answers = {}; }
  var position = 0;
  function answeredCount() { return pairs.filter(function (p) { return answers[p.id]; }).length; }
  function firstOpen() {
    for (var i = 0; i < pairs.length; i++) { if (!answers[pairs[i].id]) { return i; } }
    return pairs.length;
  }
  function nextOpen(from) {
    for (var i = from; i < pairs.length; i++) { if (!answers[pairs[i].id]) { return i; } }
    return firstOpen();
  }
  function save() { try { localStorage.setItem(key, JSON.stringify(answers)); } catch (e) { /* private mode */ } }
  function show() {
    var done = answeredCount();
    document.getElementById('progress-text').textContent = done + ' of ' + pairs.length + ' answered';
    document.getElementById('progress').value = done;
    var finished = position >= pairs.length;
    document.getElementById('question').style.display = finished ? 'none' : 'block';
    document.getElementById('finished').style.display = finished ? 'block' : 'none';
    if (finished) { return; }
    var pair = pairs[position];
    document.getElementById('pair-number').textContent = 'Pair ' + (position + 1) + ' of ' + pairs.length;
    document.getElementById('prompt').textContent = pair.prompt;
    document.getElementById('left-image').src = pair.left.src;
    document.getElementById('right-image').src = pair.right.src;
    var previous = answers[pair.id];
    ['left', 'tie', 'right'].forEach(function (choice) {
      document.getElementById('choose-' + choice).className = previous === choice ? 'chosen' : '';
    });
  }
  function choose(choice) {
    if (position >= pairs.length) { return; }
    answers[pairs[position].id] = choice;
    save();
    position = nextOpen(position + 1);
    show();
  }
  function exportAnswers() {
    var list = pairs.filter(function (p) { return answers[p.id]; }).map(function (p) {
      return {pair: p.id, variant: p.variant, baseline: p.baseline, skill: p.skill, prompt: p.prompt,
              left: p.left.variant, right: p.right.variant, choice: answers[p.id]};
    });
    var blob = new Blob([JSON.stringify({format: 'selma-human-eval/1', study: study, answers: list}, null, 1)],
                        {type: 'application/json'});
    var link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = 'human-eval-answers.json';
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
  }
  document.getElementById('choose-left').onclick = function () { choose('left'); };
  document.getElementById('choose-tie').onclick = function () { choose('tie'); };
  document.getElementById('choose-right').onclick = function () { choose('right'); };
  function back() { position = Math.max(0, position - 1); show(); }
  document.getElementById('back').onclick = back;
  document.getElementById('back-final').onclick = back;
  document.getElementById('export').onclick = exportAnswers;
  document.getElementById('export-final').onclick = exportAnswers;
  document.addEventListener('keydown', function (event) {
    if (event.key === 'ArrowLeft' || event.key === '1') { choose('left'); }
    else if (event.key === 'ArrowDown' || event.key === '2') { choose('tie'); }
    else if (event.key === 'ArrowRight' || event.key === '3') { choose('right'); }
  });
  document.getElementById('progress').max = pairs.length;
  position = firstOpen();
  show();
})();
"""

PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:1100px;padding:0 1rem;color:#222;text-align:center}
#prompt{font-size:1.2rem;margin:1rem auto;max-width:800px}.pair{display:flex;gap:1rem;justify-content:center}
.pair img{width:min(45vw,512px);height:auto;border:1px solid #ccc}
button{font-size:1rem;padding:.6rem 1.2rem;margin:.5rem}button.chosen{background:#cde;font-weight:bold}
progress{width:60%}.note{color:#555;font-size:.9rem}
"""


def write_human_eval_page(
    pairs: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "Human evaluation"
) -> Path:
    """Write the page for ``pairs`` (from build_pairs, each side with ``src`` relative to the page)."""
    public = [
        {
            "id": p["id"],
            "variant": p["variant"],
            "baseline": p["baseline"],
            "skill": p["skill"],
            "prompt": p["prompt"],
            "left": {"variant": p["left"]["variant"], "src": p["left"]["src"]},
            "right": {"variant": p["right"]["variant"], "src": p["right"]["src"]},
        }
        for p in pairs
    ]
    payload = json.dumps(public, ensure_ascii=False)
    study = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    # "</" inside a script element would end it early: escape it in the embedded JSON.
    embedded = payload.replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head>
<body data-study="{study}">
<h1>{html.escape(title)}</h1>
<p class="note">Which image matches the text better? The two images come from different models, in random order.
Keys: &larr; or 1 = left, &darr; or 2 = tie, &rarr; or 3 = right. Answers are kept in this browser until you export them.</p>
<p><progress id="progress" value="0" max="1"></progress> <span id="progress-text"></span></p>
<div id="question">
  <p id="pair-number"></p>
  <p id="prompt"></p>
  <div class="pair"><img id="left-image" alt="left image"><img id="right-image" alt="right image"></div>
  <p><button id="choose-left">Left is better</button><button id="choose-tie">Tie</button>
     <button id="choose-right">Right is better</button></p>
  <p><button id="back">Back</button><button id="export">Export answers so far (JSON)</button></p>
</div>
<div id="finished" style="display:none"><p>All pairs answered. Thank you!</p>
  <p><button id="export-final">Export answers (JSON)</button> <button id="back-final">Back</button></p>
  <p class="note">Count them with <code>selma evaluate --tally human-eval-answers.json</code>.</p></div>
<script id="pairs" type="application/json">{embedded}</script>
<script>{PAGE_JS}</script>
</body></html>
"""
    path = Path(path)
    atomic_write_text(path, page)
    return path
