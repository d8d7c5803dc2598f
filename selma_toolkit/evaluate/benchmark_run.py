"""A published benchmark on a run's variants: `selma evaluate RUN --benchmark NAME` and
``[evaluate] benchmark = NAME``.

For benchmark ``NAME`` (config/benchmarks.py) and each variant (base, the merges, ...): every
prompt of the benchmark drawn once per seed of its protocol with paired seeds (``image_seed(seed,
prompt index)``, as the held-out evaluation draws), scored by the benchmark's own rule with its
judge (the ``questions`` scorer under DSG's rule for DSG-1k and DPG-Bench, the questions' accuracy
for TIFA, VQAScore for GenAI-Bench), and summarised as the benchmark reports it: a prompt's score is
the mean of its images, the benchmark's the mean over prompts, overall and per source.

Layout, under ``<run>/eval/benchmarks/<NAME>/``: ``images/<variant>/<source>/<index>-seed<s>.png``,
``scores.json`` / ``scores.csv`` / ``summary.csv`` / ``item_scores.jsonl`` (per image, as the
held-out evaluation writes them), ``benchmark.json`` (the summary with the pinned file, seeds,
judge, protocol, licence and citation), and ``report/index.html``. Drawing and scoring resume where
they stopped; a finished benchmark is redone only when what it depends on changed (``signature``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_toolkit.config.benchmarks import Benchmark
from selma_toolkit.config.evaluate import benchmark_seeds
from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import PromptRecord
from selma_toolkit.errors import DatasetError, Option
from selma_toolkit.evaluate.benchmarks import BenchmarkItem, get_benchmark, load_benchmark
from selma_toolkit.evaluate.generate import EvalJob, draw_eval_images, generation_settings, lora_digest
from selma_toolkit.evaluate.questions import Question, QuestionSet
from selma_toolkit.evaluate.report import write_report
from selma_toolkit.evaluate.scoring import score_variants, variant_folder, variant_sort_key
from selma_toolkit.evaluate.stats import bootstrap_interval
from selma_toolkit.evaluate.vqa import (
    COMPARABILITY_NOTE,
    QuestionScorer,
    VqaAnswerer,
    build_vqascore,
    dsg_score,
    model_key,
    vqa_answerer,
)
from selma_toolkit.io import atomic_write_text, read_json
from selma_toolkit.paths import RunPaths

if TYPE_CHECKING:
    from PIL.Image import Image

BENCHMARK_FORMAT = "selma-benchmark/1"
BENCHMARK_RECORD = "benchmark.json"
ProgressCallback = Callable[[int, int], None]


def benchmark_dir(paths: RunPaths, name: str) -> Path:
    """``<run>/eval/benchmarks/<name>``."""
    return paths.eval_dir / "benchmarks" / name


def judge_model(run: RunRecipe, name: str) -> str:
    """The VQA model that judges benchmark ``name``: ``evaluate.benchmark_judges[name]``, else its default."""
    return run.evaluate.benchmark_judges.get(name) or get_benchmark(name).judge


def seeds_of(run: RunRecipe, name: str) -> list[int]:
    """The seeds benchmark ``name`` is drawn with (its protocol's unless ``evaluate.benchmark_seeds``)."""
    try:
        return benchmark_seeds(run.evaluate, name)
    except ValueError as exc:
        raise DatasetError(
            what=str(exc).partition(": ")[2], where=Option("benchmark_seeds"), found=run.evaluate.benchmark_seeds
        ) from None


def signature(run: RunRecipe, name: str, variants: Mapping[str, Path | None]) -> dict[str, Any]:
    """What a finished benchmark depends on: the pinned file, prompts, seeds, judge, generation
    settings and each variant's LoRA. Equal signatures: benchmark.json is up to date."""
    spec = get_benchmark(name)
    settings = run.evaluate.model_copy(update={"vqa_model": judge_model(run, name)})
    return {
        "benchmark": name,
        "file": {
            "repo": spec.file.repo,
            "commit": spec.file.commit,
            "path": spec.file.path,
            "git_blob": spec.file.git_blob,
            "sha256": spec.file.sha256,
        },
        "prompts": run.evaluate.benchmark_prompts or "all",
        "seeds": seeds_of(run, name),
        "judge": model_key(settings),
        "settings": generation_settings(run),
        "variants": {variant: lora_digest(lora) for variant, lora in sorted(variants.items())},
    }


def benchmark_is_current(run: RunRecipe, paths: RunPaths, name: str, variants: Mapping[str, Path | None]) -> bool:
    """Whether benchmark.json and the report were made from exactly these variants and settings."""
    record = benchmark_dir(paths, name) / BENCHMARK_RECORD
    if not (record.is_file() and (benchmark_dir(paths, name) / "report" / "index.html").is_file()):
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("signature") == signature(run, name, variants)
    except (json.JSONDecodeError, DatasetError):
        return False


class ItemQuestionScorer(QuestionScorer):
    """A benchmark's questions scorer: an image is asked its item's questions, found by its prompt id
    (the item's index), since two items may share a prompt text with other questions (TIFA v1.0)."""

    def __init__(self, spec: Benchmark, items: Sequence[BenchmarkItem], answerer: VqaAnswerer, key: str):
        source = f"{spec.file.repo}/{spec.file.path}@{spec.file.commit[:12]}"
        by_prompt: dict[str, list[Question]] = {}
        for item in items:
            by_prompt.setdefault(item.prompt, list(item.questions))
        super().__init__(QuestionSet(source, by_prompt), answerer, key, transitive=spec.transitive_dependencies)
        self.by_index = {item.index: list(item.questions) for item in items}
        canonical = json.dumps([[i, [dataclasses.astuple(q) for q in qs]] for i, qs in self.by_index.items()])
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        self.cache_key = f"{key}|{spec.name}:{digest}" + ("" if self.transitive else "|parents-by-own-answer")

    def score_by_id(self, images: Sequence[Image], prompt_ids: Sequence[int]) -> list[float | None]:
        asked = [self.by_index[i] for i in prompt_ids]
        answers = self.answer_many(images, asked)
        return [dsg_score(qs, given, transitive=self.transitive)[0] for qs, given in zip(asked, answers, strict=True)]


def _scorer(run: RunRecipe, spec: Benchmark, items: Sequence[BenchmarkItem]):
    """The benchmark's scorer with its judge, its metric named after the benchmark."""
    settings = run.evaluate.model_copy(update={"vqa_model": judge_model(run, spec.name)})
    if spec.kind == "prompts":
        scorer = build_vqascore(settings)
    else:
        scorer = ItemQuestionScorer(spec, items, vqa_answerer(settings), model_key(settings))
    scorer.name, scorer.label = spec.name, spec.title
    return scorer


def evaluate_benchmark(
    run: RunRecipe,
    paths: RunPaths,
    name: str,
    variants: Mapping[str, Path | None],
    *,
    benchmark_url: str | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Draw, score and summarise benchmark ``name`` on ``variants`` (``{variant: LoRA file or None}``);
    write benchmark.json and the report under ``benchmark_dir`` and return benchmark.json's document."""
    spec = get_benchmark(name)
    seeds = seeds_of(run, name)
    items = load_benchmark(name, benchmark_url)
    total = len(items)
    if run.evaluate.benchmark_prompts:
        items = items[: run.evaluate.benchmark_prompts]
    folder = benchmark_dir(paths, name)
    prompts: dict[str, list[PromptRecord]] = {}
    for item in items:
        prompts.setdefault(item.category, []).append(PromptRecord(item.index, item.category, item.prompt, "heldout"))
    jobs = [
        EvalJob(variant, folder / "images" / variant_folder(variant), lora, prompts)
        for variant, lora in variants.items()
    ]
    drawn = draw_eval_images(run, jobs, progress=progress, seeds=seeds)
    scorer = _scorer(run, spec, items)
    document = score_variants(
        drawn, [scorer], folder, bootstrap_samples=run.evaluate.bootstrap_samples, batch_size=run.evaluate.batch_size
    )
    results = summarise(document, spec.name, run.evaluate.bootstrap_samples)
    limited = len(items) < total
    record = {
        "format": BENCHMARK_FORMAT,
        "benchmark": spec.name,
        "title": spec.title,
        "file": {
            "url": spec.file.url(),
            "repo": spec.file.repo,
            "commit": spec.file.commit,
            "path": spec.file.path,
            "git_blob": spec.file.git_blob,
            "sha256": spec.file.sha256,
        },
        "prompts": {"used": len(items), "total": total},
        "seeds": seeds,
        "judge": {"model": judge_model(run, name), "authors": spec.authors_judge},
        "protocol": spec.protocol,
        "comparability": comparability(spec, limited),
        "licence": spec.licence,
        "citation": spec.citation,
        "homepage": spec.homepage,
        "results": results,
        "signature": signature(run, name, variants),
    }
    write_report(
        folder,
        folder / "report",
        title=f"{spec.title}: {run.name}",
        prompts_per_skill=run.evaluate.report_prompts_per_skill,
        note=report_note(record),
    )
    atomic_write_text(folder / BENCHMARK_RECORD, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return record


def summarise(document: Mapping[str, Any], metric: str, samples: int) -> dict[str, Any]:
    """Per variant: the mean over prompts of each prompt's mean over its images (the benchmark's
    number), overall and per source, each with a bootstrap interval over prompts."""
    results: dict[str, Any] = {}
    for variant in sorted(document["variants"], key=variant_sort_key):
        by_prompt: dict[tuple[str, Any], list[float]] = {}
        for item in document["items"]:
            value = item["scores"][metric]
            if item["variant"] == variant and value is not None:
                by_prompt.setdefault((item["skill"], item["prompt_id"]), []).append(value)
        means = {key: sum(values) / len(values) for key, values in by_prompt.items()}
        sources = sorted({source for source, _ in means})
        results[variant] = {
            "overall": _interval(list(means.values()), samples),
            "sources": {s: _interval([v for (source, _), v in means.items() if source == s], samples) for s in sources},
        }
    return results


def _interval(values: list[float], samples: int) -> dict[str, float | int] | None:
    return bootstrap_interval(values, samples=samples, seed=0).as_dict() if values else None


def comparability(spec: Benchmark, limited: bool) -> str:
    """What a number of this benchmark may be compared with."""
    text = (
        f"Comparable only with {spec.name} numbers from the same judge, the same pinned file (commit "
        f"{spec.file.commit[:12]}), the same seeds and images per prompt, at the same resolution and steps. "
        f"Published numbers used other judges: {spec.authors_judge}. {COMPARABILITY_NOTE}"
    )
    if limited:
        text += (
            " This run scored only the first prompts of the benchmark (evaluate.benchmark_prompts): a check, "
            "not a result to compare."
        )
    return text


def report_note(record: Mapping[str, Any]) -> str:
    """The report's paragraph: the benchmark, its file, protocol, judge, comparability, licence, citation."""
    file = record["file"]
    return (
        f"{record['title']}, {record['prompts']['used']} of {record['prompts']['total']} prompts from "
        f"{file['url']} (git blob {file['git_blob']}), seeds {record['seeds']}, judged by "
        f"{record['judge']['model']}. Protocol: {record['protocol']}. {record['comparability']} Licence: "
        f"{record['licence']}. Cite: {record['citation']}"
    )


def read_benchmark(path: str | Path) -> dict[str, Any]:
    """Read benchmark.json (or the folder holding it); errors name the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / BENCHMARK_RECORD
    document = read_json(path, missing="no benchmark results yet (evaluating a run on a benchmark writes them)")
    if not isinstance(document, dict) or document.get("format") != BENCHMARK_FORMAT:
        raise DatasetError(what="not a benchmark record", where=str(path), expected=BENCHMARK_FORMAT)
    return document
