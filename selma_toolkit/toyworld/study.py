"""`selma toyworld study`: the SELMA experiment on the toy base, scored exactly, over several seeds.

For each seed ``s`` in ``evaluate.seeds`` (a replicate: its own self-generated images, expert
training and evaluation noise; images.seed = train.seed = s), under ``<out>/seed-<s>/``:

* ``selma/``    a run folder (selma_toolkit.paths): the skills' prompts, one image per train prompt
                drawn by the base model itself (stage 2), one LoRA expert per skill (stage 3), the
                mixture LoRA on all skills' images (``joint``), and the merged experts (stage 4,
                ``merge.method`` and ``evaluate.merge_methods``);
* ``gt/``       the same prompts with ground-truth renders instead (the paper's GT-vs-generated
                comparison), and their experts;
* ``filtered/`` beyond the paper, the scorer as a data filter (best of K): per train prompt, the
                first of ``filter_candidates`` self-generated images (the one in ``selma/``, then one
                per ``candidates-<k>/`` folder, drawn with image seed ``s + 1000 k``) whose toyworld
                score is at least ``filter_min_score``; prompts without one are left out; and their experts;
* ``eval/``     evaluation images on the held-out prompts (paired noise: the same initial noise for
                every variant), ``scores.json`` and ``report/``: variants ``base``, ``joint`` and
                ``merged:<method>`` on every skill; ``expert:<skill>``, ``gt-expert:<skill>`` and
                ``filtered-expert:<skill>`` on their own skill.

Every stage is the toolkit's own (generate_prompts, generate_images, train_expert, merge_files,
draw_eval_images, score_variants, write_report), so each resumes after a stop; a rerun skips what
is done. The summary over seeds (``study.json``, ``study.md``, ``study.png``) is written by
:mod:`selma_toolkit.toyworld.study_report`.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

from selma_toolkit.dataset import METADATA, read_image_dataset, read_prompts
from selma_toolkit.errors import RecipeError
from selma_toolkit.images import image_name, image_seed
from selma_toolkit.io import atomic_write_bytes, atomic_write_text
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.recipe import RunRecipe, write_resolved_recipe

log = logging.getLogger(__name__)

DATA_KINDS = ("selma", "gt", "filtered")
EXPERT_PREFIX = {"selma": "expert", "gt": "gt-expert", "filtered": "filtered-expert"}
CANDIDATE_SEED_STEP = 1000
Progress = Callable[[str, int, "int | None"], None]


def replicate_recipe(run: RunRecipe, seed: int) -> RunRecipe:
    """The run of one replicate: image, training and evaluation seeds set to ``seed``."""
    return run.model_copy(update={
        "images": run.images.model_copy(update={"seed": seed}),
        "train": run.train.model_copy(update={"seed": seed}),
        "evaluate": run.evaluate.model_copy(update={"seeds": [seed]}),
    })


def check_study_recipe(run: RunRecipe) -> None:
    """The study needs toy skills with grammar prompts and the toyworld scorer; say what is missing."""
    from selma_toolkit.toyworld.world import CaptionError, parse_caption

    problems = []
    if "toyworld" not in run.evaluate.scorers:
        problems.append("evaluate.scorers must include 'toyworld'")
    if run.evaluate.prompts_per_skill < 1:
        problems.append("evaluate.prompts_per_skill must be at least 1 (held-out prompts are what is scored)")
    for skill in run.skills:
        if skill.source != "grammar":
            problems.append(f"skill {skill.name!r} has source {skill.source!r}; the study uses shapes-world grammars")
        for seed_prompt in skill.seeds:
            try:
                parse_caption(seed_prompt)
            except CaptionError as exc:
                problems.append(f"skill {skill.name!r}: {exc}")
    if not run.skills:
        problems.append("skills: the study needs at least one toy skill (e.g. toy-count)")
    if problems:
        raise RecipeError(f"run recipe {run.name!r} cannot drive the shapes-world study:\n  " + "\n  ".join(problems)
                          + "\nStart from recipes/runs/toy-study.toml.")


# ------------------------------------------------------------------------------------ datasets


def _write_dataset(folder: Path, examples: list[tuple[int, str, str, object]], extra: dict[str, object]) -> None:
    """An imagefolder dataset: ``examples`` of (prompt id, skill, caption, PIL image or source path)."""
    rows = []
    for prompt_id, skill, caption, image in examples:
        name = image_name(prompt_id)
        if isinstance(image, Path):
            data = image.read_bytes()
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
        atomic_write_bytes(folder / name, data)
        atomic_write_text(folder / image_name(prompt_id, "txt"), caption)
        rows.append(json.dumps({"file_name": name, "text": caption, "prompt_id": prompt_id, "skill": skill, **extra}) + "\n")
    # metadata.jsonl last: its presence marks the dataset complete.
    atomic_write_text(folder / METADATA, "".join(rows))


def write_ground_truth(run: RunRecipe, skill: str, paths: RunPaths) -> int:
    """Ground-truth renders of ``skill``'s train prompts into ``paths.images(skill)``; each
    placement drawn from ``image_seed(images.seed, prompt id)``. Returns the number of images."""
    from selma_toolkit.toyworld.renderer import render_caption

    folder = paths.images(skill)
    prompts = sorted(read_prompts(paths.prompts(skill), split="train"), key=lambda p: p.id)
    if not (folder / METADATA).is_file():
        seed = run.images.seed
        examples = [(p.id, skill, p.prompt, render_caption(p.prompt, random.Random(image_seed(seed, p.id)))) for p in prompts]
        _write_dataset(folder, examples, {"source": "ground-truth render", "seed": seed})
    return len(prompts)


def write_filtered(sources: list[RunPaths], skill: str, paths: RunPaths, min_score: float) -> tuple[int, int]:
    """Best-of-K filtering: for each train prompt of ``skill``, the first of its self-generated
    candidates (one per run folder in ``sources``, in order) whose toyworld score is at least
    ``min_score``, copied into ``paths.images(skill)``. Returns (prompts kept, prompts)."""
    from PIL import Image

    from selma_toolkit.toyworld.scorer import score_image

    candidates = [{int(r.extra["prompt_id"]): r for r in read_image_dataset(source.images(skill))} for source in sources]
    folder = paths.images(skill)
    record_path = folder / ".selma-filter.json"
    wanted = {"min_score": min_score, "candidates": len(sources)}
    if (folder / METADATA).is_file() and record_path.is_file():
        done = json.loads(record_path.read_text())
        if all(done.get(key) == value for key, value in wanted.items()):
            return done["kept"], done["total"]
    kept = []
    for prompt_id, first in sorted(candidates[0].items()):
        for records in candidates:
            record = records.get(prompt_id)
            if record is None:
                continue
            with Image.open(record.path) as image:
                score = score_image(image.convert("RGB"), record.text)
            if score is not None and score >= min_score:
                kept.append((prompt_id, skill, record.text, record.path))
                break
    total = len(candidates[0])
    if not kept:
        raise RecipeError(f"{sources[0].images(skill)}: none of the {total} prompts has a self-generated image (of "
                          f"{len(sources)} per prompt) scoring {min_score} or more, so the filtered expert cannot be "
                          "trained: lower --filter-min-score or raise --filter-candidates")
    folder.mkdir(parents=True, exist_ok=True)
    _write_dataset(folder, kept, {"source": f"self-generated, best of {len(sources)}, toyworld score >= {min_score}"})
    atomic_write_text(record_path, json.dumps({**wanted, "kept": len(kept), "total": total}) + "\n")
    return len(kept), total


# ------------------------------------------------------------------------------------ a replicate


def _copy_prompts(source: RunPaths, target: RunPaths, skill: str) -> None:
    if not target.prompts(skill).is_file():
        atomic_write_bytes(target.prompts(skill), source.prompts(skill).read_bytes())


def _train(run: RunRecipe, paths: RunPaths, names: list[str], label: str, progress: Progress) -> None:
    from selma_toolkit.train import train_expert

    for name in names:
        if not paths.expert(name).is_file():
            train_expert(run, name, paths, progress=lambda e, n=name: progress(f"{label} {n}", e.done, e.total))


def run_replicate(run: RunRecipe, out: Path, seed: int, *, filter_min_score: float = 100.0, filter_candidates: int = 4,
                  progress: Progress | None = None) -> dict[str, object]:
    """Every stage of one replicate (see the module docstring); returns its record (also written
    to ``seed-<s>/replicate.json``) with the data sizes and the path of its scores.json."""
    from selma_toolkit.evaluate.generate import EvalJob, draw_eval_images, heldout_prompts
    from selma_toolkit.evaluate.report import write_report
    from selma_toolkit.evaluate.scoring import score_variants, variant_folder
    from selma_toolkit.images import generate_images
    from selma_toolkit.lora.merge import merge_files
    from selma_toolkit.prompts import generate_prompts
    from selma_toolkit.toyworld.scorer import ToyWorldScorer

    report = progress or (lambda label, done, total: None)
    run = replicate_recipe(run, seed)
    root = out / f"seed-{seed}"
    roots = {kind: RunPaths(root / kind) for kind in DATA_KINDS}
    skills = [s.name for s in run.skills]
    selma, gt, filtered = roots["selma"], roots["gt"], roots["filtered"]
    for paths in roots.values():
        write_resolved_recipe(run, paths.root)

    for skill in run.skills:
        generate_prompts(skill, selma.prompts(skill.name), run.evaluate.prompts_per_skill)
        for other in (gt, filtered):
            _copy_prompts(selma, other, skill.name)
    # Extra self-generated candidates for best-of-K filtering: the same stage with other image seeds.
    extra = [(RunPaths(root / f"candidates-{k}"), run.model_copy(update={
        "images": run.images.model_copy(update={"seed": seed + CANDIDATE_SEED_STEP * k})})) for k in range(1, filter_candidates)]
    data: dict[str, dict[str, object]] = {}
    for skill in skills:
        stats = generate_images(run, skill, selma, progress=lambda d, t, s=skill: report(f"self-generated {s}", d, t))
        data.setdefault("selma", {})[skill] = stats.images
        data.setdefault("gt", {})[skill] = write_ground_truth(run, skill, gt)
        for paths, candidate_run in extra:
            _copy_prompts(selma, paths, skill)
            generate_images(candidate_run, skill, paths, progress=lambda d, t, s=skill: report(f"candidates {s}", d, t))
        kept, total = write_filtered([selma, *(paths for paths, _ in extra)], skill, filtered, filter_min_score)
        data.setdefault("filtered", {})[skill] = kept
        log.info("seed %d, %s: %d of %d prompts have a self-generated image (best of %d) scoring >= %s", seed, skill,
                 kept, total, filter_candidates, filter_min_score)

    _train(run, selma, skills + ([JOINT] if run.joint else []), "train", report)
    _train(run, gt, skills, "train gt", report)
    _train(run, filtered, skills, "train filtered", report)
    methods = list(dict.fromkeys([run.merge.method, *run.evaluate.merge_methods]))
    for method in methods:
        if not selma.merged(method).is_file():
            merge_files([selma.expert(s) for s in skills], selma.merged(method), method, run.merge.weights,  # type: ignore[arg-type]
                        run.merge.rank, format=run.train.lora_format, density=run.merge.density, seed=run.merge.seed)

    eval_dir = root / "eval"
    prompts = heldout_prompts(run, selma)
    variants: dict[str, tuple[Path | None, list[str]]] = {"base": (None, skills)}
    for kind in DATA_KINDS:
        variants.update({f"{EXPERT_PREFIX[kind]}:{s}": (roots[kind].expert(s), [s]) for s in skills})
    if run.joint:
        variants["joint"] = (selma.expert(JOINT), skills)
    variants.update({f"merged:{m}": (selma.merged(m), skills) for m in methods})
    jobs = [EvalJob(name, eval_dir / "images" / variant_folder(name), lora, {s: prompts[s] for s in chosen})
            for name, (lora, chosen) in variants.items()]
    items = draw_eval_images(run, jobs, progress=lambda d, t: report("evaluation images", d, t))
    score_variants(items, [ToyWorldScorer()], eval_dir, bootstrap_samples=run.evaluate.bootstrap_samples,
                   batch_size=run.evaluate.batch_size)
    write_report(eval_dir, root / "report", title=f"Shapes-world study: {run.name}, seed {seed}",
                 prompts_per_skill=run.evaluate.report_prompts_per_skill, human_eval_pairs=run.evaluate.human_eval_pairs or None)
    record = {"seed": seed, "train_images": data, "filter_min_score": filter_min_score, "filter_candidates": filter_candidates,
              "scores": str((eval_dir / "scores.json").relative_to(out)), "merge_methods": methods}
    atomic_write_text(root / "replicate.json", json.dumps(record, indent=1) + "\n")
    return record


def run_study(run: RunRecipe, out: str | Path, *, seeds: list[int] | None = None, filter_min_score: float = 100.0,
              filter_candidates: int = 4, progress: Progress | None = None) -> Path:
    """Run (or resume) the replicates for ``seeds`` (default: the recipe's evaluate.seeds), then
    summarise every finished replicate in ``out``; return the path of study.md."""
    from selma_toolkit.toyworld.study_report import write_study_report

    check_study_recipe(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_recipe(run, out)
    for seed in seeds if seeds is not None else run.evaluate.seeds:
        log.info("study %s: replicate seed %d", run.name, seed)
        run_replicate(run, out, seed, filter_min_score=filter_min_score, filter_candidates=filter_candidates,
                      progress=progress)
    return write_study_report(out, run)
