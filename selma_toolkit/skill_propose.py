"""`selma skill propose`: let the base model's failures propose the skills to teach it.

SELMA starts from skills a person names. Here the model names them: it draws images for the
user's own prompts (a text file, one prompt a line), a scorer checks each image, the failing
prompts are grouped by what fails, and each group large enough becomes a skill recipe (the format
`selma skill new` writes) whose seed prompts, the LLM's in-context examples, are the group's
failing prompts. A run recipe lists it like any other skill; `selma run` trains and merges it.

What fails, per scorer (the rules: selma_toolkit/failure_groups.py):

* **question scorers**: ``toyworld`` (its question kinds: entity, colour, count, relation) and
  ``questions`` (a DSG/TIFA question file answered by a VQA model; kinds read from the questions'
  words). The failing prompts are grouped by the kind of question that fails first (a question
  answered wrong while its parents were right, DSG's rule); a kind is proposed when enough failing
  prompts fail it and it fails in enough of the images that ask it.
* **other scorers** (``clipscore``, ``pickscore``, ``hps``, ``imagereward``, ``vqascore``): one
  number per image and no reason; the failing prompts are clustered on text embeddings (the
  scorer's own CLIP text embeddings where it has them, else TF-IDF word vectors).

A prompt fails when its mean score is below ``threshold``: by default 100 for question scorers
(some question is wrong), else the lower quartile of the list's own scores (no fixed "right"
value exists for a similarity or reward model).

For ``toyworld`` the recipe uses the offline grammar source, so `selma run` trains it with no LLM:
each failing prompt becomes a template that keeps its structure (the counts, the relation, which
objects have a colour) and frees its colours and shapes (``four red circles`` -> ``four {color}
{shape}s``). Otherwise it asks an LLM, its instruction naming what failed.

Output folder: ``images/`` (``LLLL-J.png``: line L's image J), ``draws.jsonl`` (one record per
image, appended after the image is written: the resume mark), ``.selma-propose.json`` (the
settings the images were drawn with), then ``report.json`` (every prompt: scores, what failed and
the first wrong questions; every kind or cluster; the proposals), ``summary.md`` and
``skills/<name>.toml``. A stopped call resumes; a finished folder is refused unless ``force``
(then it is grouped again from its images, without drawing them again).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from selma_toolkit.config.base import NAME_PATTERN
from selma_toolkit.config.evaluate import EvaluateSettings
from selma_toolkit.config.prompts import LLMSettings
from selma_toolkit.config.recipes import SkillRecipe
from selma_toolkit.errors import DatasetError, Fields, InputError, Option, OutputError, RecipeError, Remedy
from selma_toolkit.failure_groups import (
    FailureGroup,
    ImageVerdict,
    PromptResult,
    check_scorer,
    group_by_embedding,
    group_by_kind,
    judge_for,
    tfidf_embeddings,
)
from selma_toolkit.io import (
    JsonlAppender,
    atomic_write_bytes,
    atomic_write_text,
    check_output_folder,
    folder_lock,
    read_jsonl,
)
from selma_toolkit.models import detect_architecture, load_pipeline
from selma_toolkit.recipe import apply_overrides, skill_recipe_from_dict
from selma_toolkit.skill_new import GENERIC_INSTRUCTION, recipe_text
from selma_toolkit.toyworld.world import COLORS, RELATIONS, SHAPES, parse_caption

log = logging.getLogger(__name__)

SETTINGS_FILE = ".selma-propose.json"
DRAWS, REPORT, SUMMARY = "draws.jsonl", "report.json", "summary.md"
QUESTION_SCORERS = ("toyworld", "questions")
# Question kinds -> the rule that an LLM recipe's instruction states for the skill.
KIND_RULES: dict[str, str] = {
    "count": "count objects: each description says exactly how many of some objects there are",
    "color": "bind colours to objects: each description gives two or more objects their own colours",
    "relation": "place objects in space: each description says where one object is relative to another "
    "(left of, right of, above, below, ...)",
    "spatial": "place objects in space: each description says where one object is relative to another "
    "(left of, right of, above, below, ...)",
    "entity": "draw every object named: each description names objects by their shape or kind",
    "objects": "draw every object named: each description names several objects",
    "text": "render text: each description asks for written words in the image",
    "attributes": "give objects the attributes named: material, size, state or action",
}
_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class DrawSettings:
    """How the base model draws each prompt (the paper: 50 steps, guidance 7.5); ``resolution``
    None is the model's own (its UNet sample size times the VAE factor)."""

    steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None
    seed: int = 0
    images_per_prompt: int = 2
    batch_size: int = 8
    dtype: str = "auto"


@dataclass(frozen=True)
class ProposedSkill:
    """A written skill recipe and the failing prompts it came from."""

    name: str
    path: Path
    key: str
    prompts: tuple[str, ...]
    lines: tuple[int, ...]
    failure_rate: float | None
    recipe: SkillRecipe = field(repr=False)


# ----------------------------------------------------------------------------------- the input


def read_prompt_file(path: str | Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each line of a text file that is neither blank nor a ``#`` comment;
    errors name the file and line (missing, not UTF-8, no prompts, a prompt repeated)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"{path}: prompt file not found"
            + (" (it is a folder)" if path.is_dir() else "")
            + "; expected a text file with one prompt a line"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}); expected one prompt a line") from None
    prompts, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        prompt = " ".join(line.split())
        if not prompt or prompt.startswith("#"):
            continue
        if prompt in seen:
            raise DatasetError(f"{path}:{number}: {prompt!r} repeats line {seen[prompt]}; list each prompt once")
        seen[prompt] = number
        prompts.append((number, prompt))
    if not prompts:
        raise DatasetError(
            f"{path}: holds no prompts (only blank or # comment lines); expected one prompt a line, "
            "e.g. 'three red circles'"
        )
    return prompts


def evaluate_settings(scorer: str, overrides: Sequence[str] = ()) -> EvaluateSettings:
    """The ``[evaluate]`` settings for ``scorer`` with ``key=value`` overrides (``clip_model=tiny:clip``)."""
    from pydantic import ValidationError

    check_scorer(scorer)
    try:
        return EvaluateSettings.model_validate(apply_overrides({"scorers": [scorer]}, list(overrides)))
    except ValidationError as exc:
        found = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise RecipeError(
            what=f"not valid [evaluate] settings for scorer {scorer!r}: {found}",
            where=Option("overrides"),
            found=list(overrides),
        ) from None


# ---------------------------------------------------------------------------------- the entry


def propose_skills(
    prompts_file: str | Path,
    base_model: str,
    out: str | Path,
    *,
    scorer: str = "toyworld",
    threshold: float | None = None,
    draw: DrawSettings = DrawSettings(),
    evaluate: EvaluateSettings | None = None,
    min_prompts: int = 3,
    min_failure_rate: float = 0.25,
    max_skills: int = 3,
    source: Literal["llm", "grammar"] | None = None,
    prefix: str = "fix-",
    num_prompts: int | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> list[ProposedSkill]:
    """Draw ``base_model``'s images for the prompts of ``prompts_file``, score them with ``scorer``
    (its models from ``evaluate``), group the failing prompts by what fails and write one skill
    recipe per group into ``out/skills/`` (module docstring: the rules and the folder).

    ``source``: the recipes' prompt source (default: grammar for toyworld, else llm); ``prefix``
    starts each skill name (``fix-count``); ``num_prompts`` each recipe's prompt count (default:
    the paper's 1000, for a grammar at most half the prompts it can make). ``progress(done, total)``
    counts images. Raises DatasetError (prompt file), InputError (scorer, settings), OutputError
    (``out``), ModelError (base model).
    """
    prompts_file, out = Path(prompts_file), Path(out)
    prompts = read_prompt_file(prompts_file)
    check_scorer(scorer)
    if source not in (None, "llm", "grammar"):
        raise InputError(what="", where=Option("source"), found=source, expected="llm or grammar")
    if source == "grammar" and scorer != "toyworld":
        raise InputError(
            what=f"a grammar can be derived only from shapes-world captions (the toyworld scorer), not "
            f"with the {scorer} scorer",
            where=Option("source"),
            found=source,
            remedies=[Remedy.set("source", "llm", note="the recipes ask an LLM"), Remedy.set("scorer", "toyworld")],
        )
    judge = judge_for(scorer, evaluate)
    for line, prompt in prompts:
        problem = judge.check(prompt)
        if problem:
            raise DatasetError(f"{prompts_file}:{line}: {prompt!r}: {problem}")
    bad = [
        Fields("", (Option(name),), value, wanted)
        for name, value, ok, wanted in [
            ("images_per_prompt", draw.images_per_prompt, draw.images_per_prompt >= 1, "1 or more"),
            ("steps", draw.steps, draw.steps >= 1, "1 or more"),
            ("batch_size", draw.batch_size, draw.batch_size >= 1, "1 or more"),
            ("min_prompts", min_prompts, min_prompts >= 3, "3 or more (a skill recipe needs three seed prompts)"),
            ("min_failure_rate", min_failure_rate, 0 <= min_failure_rate <= 1, "a share from 0 to 1"),
            ("max_skills", max_skills, max_skills >= 1, "1 or more"),
        ]
        if not ok
    ]
    if len(bad) == 1:
        raise InputError(what="", where=bad[0].where, found=bad[0].found, expected=bad[0].expected)
    if bad:
        raise InputError(what="invalid values", details=bad)
    record = {
        "base_model": base_model,
        "prompts": [p for _, p in prompts],
        "scorer": scorer,
        "scorer_model": judge.model_id,
        **vars(draw),
    }
    _check_out(out, record, force)
    detect_architecture(base_model)  # a ModelError before any work
    with folder_lock(out, "selma skill propose"):
        atomic_write_text(out / SETTINGS_FILE, json.dumps(record, indent=2) + "\n")
        results = _draw_and_judge(prompts, base_model, out, draw, judge, progress)
        log.info(
            "%s: %d prompts x %d image(s) drawn by %s and judged by %s",
            prompts_file,
            len(prompts),
            draw.images_per_prompt,
            base_model,
            scorer,
        )
        question_scorer = scorer in QUESTION_SCORERS
        if threshold is None:
            threshold = 100.0 if question_scorer else _lower_quartile([r.score for r in results])
        if question_scorer:
            groups = group_by_kind(results, threshold, min_prompts=min_prompts, min_failure_rate=min_failure_rate)
        else:
            groups = group_by_embedding(
                results, _embeddings(judge, results, out), threshold, min_prompts=min_prompts, max_skills=max_skills
            )
        source = source or ("grammar" if scorer == "toyworld" else "llm")
        proposed = _write_recipes(groups, out, base_model, scorer, source, prefix, num_prompts)
        _write_report(out, prompts_file, record, threshold, results, groups, proposed)
    return proposed


def _check_out(out: Path, record: dict[str, Any], force: bool) -> None:
    check_output_folder(out)
    if not out.is_dir() or not any(p.name != ".selma.lock" for p in out.iterdir()):
        return
    settings = out / SETTINGS_FILE
    if not settings.is_file():
        raise OutputError(
            what="exists and holds files that `selma skill propose` did not write",
            where=Option("out"),
            found=out,
            remedies=[Remedy.change("out", "folder", note="an empty or new one")],
        )
    try:
        previous = json.loads(settings.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise OutputError(
            what="not valid JSON",
            where=str(settings),
            remedies=[Remedy.change("out", "folder"), Remedy.do("delete the folder")],
        ) from None
    changed = [k for k in record if previous.get(k) != record[k]]
    if changed:
        raise OutputError(
            what=f"holds a proposal drawn with other inputs ({', '.join(changed)} differ)",
            where=str(out),
            remedies=[Remedy.change("out", "folder"), Remedy.do("delete the folder to start over")],
        )
    if (out / REPORT).is_file() and not force:
        raise OutputError(
            what=f"already holds a finished proposal ({out / REPORT})",
            where=str(out),
            remedies=[
                Remedy.change("out", "folder"),
                Remedy.set("force", True, note="to group its images again and rewrite its recipes"),
            ],
        )


def image_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of image ``index`` of ``prompt``: 31 bits of sha256, so another list keeps a prompt's images."""
    digest = hashlib.sha256(f"selma-propose:{seed}:{index}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _image_file(line: int, index: int) -> str:
    return f"images/{line:04d}-{index}.png"


def _draw_and_judge(
    prompts: list[tuple[int, str]],
    base_model: str,
    out: Path,
    draw: DrawSettings,
    judge: Any,
    progress: ProgressCallback | None,
) -> list[PromptResult]:
    """Draw and judge every (prompt, image index) not yet in draws.jsonl; return every prompt's verdicts."""
    done: dict[tuple[str, int], ImageVerdict] = {}
    if (out / DRAWS).is_file():
        for row in read_jsonl(out / DRAWS, repair_tail=True):
            if (out / row["file"]).is_file():
                done[(row["prompt"], row["index"])] = ImageVerdict(
                    row["score"], tuple(row["asked"]), tuple(row["failed"]), tuple(row["wrong"])
                )
    # Fixed batches over every image, redrawn whole when one of theirs is missing: an image is then
    # bit-for-bit the same after a resume (as in images/generate.py), not just up to float rounding.
    items = [(line, prompt, j) for line, prompt in prompts for j in range(draw.images_per_prompt)]
    batches = [items[start : start + draw.batch_size] for start in range(0, len(items), draw.batch_size)]
    pending = [batch for batch in batches if any((p, j) not in done for _, p, j in batch)]
    count = sum((p, j) in done for _, p, j in items)
    if progress:
        progress(count, len(items))
    if pending:
        import torch

        pipe = load_pipeline(base_model, dtype=draw.dtype)
        size = {} if draw.resolution is None else {"height": draw.resolution, "width": draw.resolution}
        with JsonlAppender(out / DRAWS) as writer:
            for batch in pending:
                generators = [torch.Generator("cpu").manual_seed(image_seed(draw.seed, p, j)) for _, p, j in batch]
                images = pipe(
                    prompt=[p for _, p, _ in batch],
                    num_inference_steps=draw.steps,
                    output_type="pil",
                    guidance_scale=draw.guidance_scale,
                    generator=generators,
                    **size,
                ).images
                missing = [(item, image) for item, image in zip(batch, images) if (item[1], item[2]) not in done]
                verdicts = judge.judge([image for _, image in missing], [p for (_, p, _), _ in missing])
                for ((line, prompt, j), image), verdict in zip(missing, verdicts):
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    atomic_write_bytes(out / _image_file(line, j), buffer.getvalue())
                    writer.append(
                        {
                            "line": line,
                            "prompt": prompt,
                            "index": j,
                            "file": _image_file(line, j),
                            "seed": image_seed(draw.seed, prompt, j),
                            "score": verdict.score,
                            "asked": list(verdict.asked),
                            "failed": list(verdict.failed),
                            "wrong": list(verdict.wrong),
                        }
                    )
                    done[(prompt, j)] = verdict
                count += len(missing)
                if progress:
                    progress(count, len(items))
    results = [
        PromptResult(line, prompt, tuple(done[(prompt, j)] for j in range(draw.images_per_prompt)))
        for line, prompt in prompts
    ]
    unscored = [r for r in results if any(math.isnan(v.score) for v in r.verdicts)]
    if unscored:
        raise DatasetError(
            f"line {unscored[0].line}: {unscored[0].prompt!r}: the scorer gave no score for its image; "
            "choose a scorer that applies to every prompt"
        )
    return results


def _lower_quartile(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 4] + 1e-9 if ordered else 0.0  # the quartile itself fails too


def _embeddings(judge: Any, results: Sequence[PromptResult], out: Path) -> Any:
    """The scorer's CLIP text embeddings where it has them (read with each prompt's first image), else TF-IDF."""
    embed = getattr(getattr(judge, "scorer", None), "embeddings", None)
    if embed is None:
        return tfidf_embeddings([r.prompt for r in results])[0]
    from PIL import Image

    images = [Image.open(out / _image_file(r.line, 0)).convert("RGB") for r in results]
    return embed(images, [r.prompt for r in results])[1].cpu().numpy()


# ------------------------------------------------------------------------------------ writing


def toy_template(prompt: str) -> str:
    """A grammar template that keeps a shapes-world caption's structure and frees its colours and
    shapes: ``two red circles and a square`` -> ``two {color} {shape1}s and a {shape2}``."""
    scene = parse_caption(prompt)
    colors = iter(["{color}", "{color2}", "{color3}", "{color4}"])
    phrases = []
    for number, group in enumerate(scene.groups, start=1):
        shape = "{shape}" if len(scene.groups) == 1 else f"{{shape{number}}}"
        color = f"{next(colors)} " if group.color else ""
        phrases.append(f"{_NUMBERS[group.count]} {color}{shape}{'s' if group.count > 1 else ''}")
    words = {v: k for k, v in RELATIONS.items()}
    return f" {words[scene.relation]} ".join(phrases) if scene.relation else " and ".join(phrases)


def _grammar_capacity(templates: Sequence[str], words: dict[str, list[str]]) -> int:
    """How many distinct prompts the templates can make (slots of one list take distinct words)."""
    total = 0
    for template in templates:
        slots = Counter(re.sub(r"\d+$", "", s) for s in dict.fromkeys(re.findall(r"\{(\w+)\}", template)))
        total += math.prod(math.perm(len(words[n]), m) for n, m in slots.items())
    return total


def _recipe_data(
    group: FailureGroup, name: str, base_model: str, scorer: str, source: str, num_prompts: int | None
) -> tuple[dict[str, Any], str]:
    seeds = [r.prompt for r in group.prompts][:20]
    what = (
        f"{group.key} questions fail first in {group.failure_rate:.0%} of the images asking them"
        if group.failure_rate is not None
        else f"a cluster of failing prompts sharing {', '.join(group.words) or 'no words'}"
    )
    data: dict[str, Any] = {
        "name": name,
        "source": source,
        "seeds": seeds,
        "description": f"Proposed from {len(group.prompts)} prompts that {base_model} draws unfaithfully "
        f"({scorer} scorer: {what}).",
    }
    note = ""
    if source == "grammar":
        templates = list(dict.fromkeys(toy_template(p) for p in seeds))
        grammar_words = {"color": list(COLORS), "shape": list(SHAPES)}
        capacity = _grammar_capacity(templates, grammar_words)
        data.update(
            grammar={"templates": templates, "words": grammar_words},
            similarity_threshold=0.95,
            llm=LLMSettings().model_dump(mode="json", exclude_none=True),  # unused: no [llm] table
            max_words=max(len(t.split()) for t in templates),
            num_prompts=min(num_prompts or 1000, max(capacity // 2, 1)),
        )
        note = (
            f"# The grammar keeps each failing prompt's structure and frees its colours and shapes: it can make "
            f"{capacity} distinct\n# prompts, so num_prompts leaves half of them for held-out prompts. Its "
            "similarity_threshold is 0.95 (as\n# recipes/skills/toy-*.toml): grammar captions differ in a word or two.\n"
        )
    else:
        if group.key in KIND_RULES:
            rule = f"The descriptions should test a model's capability to {KIND_RULES[group.key]}."
        else:
            shared = f" (they share the words {', '.join(group.words)})" if group.words else ""
            rule = (
                f"The descriptions should be like the examples, which a text-to-image model drew unfaithfully{shared}."
            )
        first_rule = GENERIC_INSTRUCTION.split("\n")[1]  # "1. <fill in: what the descriptions should test ...>"
        data["instruction"] = GENERIC_INSTRUCTION.replace(first_rule, f"1. {rule}")
        data["max_words"] = max(30, *(len(p.split()) for p in seeds))
        if num_prompts:
            data["num_prompts"] = num_prompts
    return data, note


def _write_recipes(
    groups: Sequence[FailureGroup],
    out: Path,
    base_model: str,
    scorer: str,
    source: str,
    prefix: str,
    num_prompts: int | None,
) -> list[ProposedSkill]:
    folder = out / "skills"
    for stale in folder.glob("*.toml") if folder.is_dir() else []:
        stale.unlink()  # from an earlier grouping of this folder (--force)
    proposed, used = [], set()
    for group in (g for g in groups if g.proposed):
        base = re.sub(r"[^a-z0-9_-]+", "-", f"{prefix}{group.skill}".lower()).strip("-_")[:60] or "proposed"
        base = base if re.match(NAME_PATTERN, base) else f"p-{base}"
        name, n = base, 1
        while name in used:  # two clusters with the same top words
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        data, note = _recipe_data(group, name, base_model, scorer, source, num_prompts)
        wanted = skill_recipe_from_dict(data, f"proposed skill {name!r}")
        lines = "\n".join(
            f"#   line {r.line}: {r.prompt}  (score {r.score:.0f}"
            + (f"; {', '.join(sorted(r.failed_kinds()))} failed" if r.failed_kinds() else "")
            + ")"
            for r in group.prompts
        )
        text = (
            f"# Proposed by `selma skill propose` for {base_model}: these prompts of the list failed ({scorer} scorer):\n"
            f'{lines}\n# Review it, then list it in a run recipe: skills = ["{name}.toml"].\n{note}\n'
            + recipe_text(data, command="selma skill propose")
        )
        if skill_recipe_from_dict(tomllib.loads(text), name) != wanted:
            raise RuntimeError(f"skill_propose: the written recipe differs from its values:\n{text}")
        path = folder / f"{name}.toml"
        atomic_write_text(path, text)
        proposed.append(
            ProposedSkill(
                name,
                path,
                group.key,
                tuple(r.prompt for r in group.prompts),
                tuple(r.line for r in group.prompts),
                group.failure_rate,
                wanted,
            )
        )
    return proposed


def _write_report(
    out: Path,
    prompts_file: Path,
    record: dict[str, Any],
    threshold: float,
    results: Sequence[PromptResult],
    groups: Sequence[FailureGroup],
    proposed: Sequence[ProposedSkill],
) -> None:
    by_key = {s.key: s.name for s in proposed}
    membership: dict[int, list[str]] = {}
    for group in groups:
        for r in group.prompts:
            membership.setdefault(r.line, []).append(group.key)
    report = {
        "prompts_file": str(prompts_file),
        "threshold": threshold,
        "settings": {k: v for k, v in record.items() if k != "prompts"},
        "prompts": [
            {
                "line": r.line,
                "prompt": r.prompt,
                "score": r.score,
                "failing": r.score < threshold,
                "failed": r.failed_share(),
                "groups": membership.get(r.line, []),
                "images": [
                    {"file": _image_file(r.line, j), "score": v.score, "failed": list(v.failed), "wrong": list(v.wrong)}
                    for j, v in enumerate(r.verdicts)
                ],
            }
            for r in results
        ],
        "groups": [
            {
                "key": g.key,
                "failure_rate": g.failure_rate,
                "words": list(g.words),
                "lines": [r.line for r in g.prompts],
                "proposed": g.proposed,
                "skill": by_key.get(g.key),
                "reason": g.reason,
            }
            for g in groups
        ],
        "proposed": [
            {
                "name": s.name,
                "recipe": str(s.path.relative_to(out)),
                "key": s.key,
                "lines": list(s.lines),
                "failure_rate": s.failure_rate,
            }
            for s in proposed
        ],
    }
    atomic_write_text(out / REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    failing = [r for r in results if r.score < threshold]
    lines = [
        f"# Skills proposed from {prompts_file.name} on {record['base_model']}",
        "",
        f"{len(failing)} of {len(results)} prompts failed (mean {record['scorer']} score below {threshold:.4g} over "
        f"{record['images_per_prompt']} image(s) each).",
        "",
    ]
    for g in groups:
        rate = "" if g.failure_rate is None else f", fails first in {g.failure_rate:.0%} of the images asking it"
        head = f"- **{g.key}**{rate}: {len(g.prompts)} prompt(s)"
        lines.append(
            f"{head} -> proposed `skills/{by_key[g.key]}.toml`" if g.proposed else f"{head}, not proposed: {g.reason}"
        )
    lines += [
        "",
        "| line | prompt | score | what failed first (questions answered wrong) |",
        "| --- | --- | --- | --- |",
    ]
    for r in failing:
        wrong = "; ".join(dict.fromkeys(w for v in r.verdicts for w in v.wrong))
        what = ", ".join(f"{k} {s:.0%}" for k, s in r.failed_share().items())
        lines.append(
            f"| {r.line} | {r.prompt} | {r.score:.0f} | {what}{f' ({wrong})' if wrong else ''} |".replace("|  |", "| |")
        )
    atomic_write_text(out / SUMMARY, "\n".join(lines) + "\n")
