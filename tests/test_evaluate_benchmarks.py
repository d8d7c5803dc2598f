"""Published benchmarks by name: their files fetched from a local server in GitHub's raw layout,
checked against their pins, cached, read by the question readers; `selma evaluate RUN --benchmark
dsg-1k` end to end with a tiny judge; each benchmark's protocol (DPG-Bench's four images, GenAI-Bench's
VQAScore), the summary's numbers against the per-image scores, and the recipe's benchmark stage."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess

import pytest
from support_benchmarks import FILES, benchmark_server, git_blob, pinned_to_test_files
from typer.testing import CliRunner

from selma_toolkit.config import benchmarks as table
from selma_toolkit.errors import DatasetError, RecipeError
from selma_toolkit.evaluate.benchmarks import fetch_pinned, git_blob_id, load_benchmark
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import load_run_recipe, write_resolved_recipe
from selma_toolkit.tiny import cache_dir

TINY = [
    "images.steps=2",
    "images.resolution=32",
    "evaluate.bootstrap_samples=100",
    "evaluate.benchmark_judges.dsg-1k='tiny:paligemma'",
    "evaluate.benchmark_judges.dpg-bench='tiny:llava'",
    "evaluate.benchmark_judges.tifa-v1='tiny:blip2'",
    "evaluate.benchmark_judges.genai-bench='tiny:paligemma'",
]


@pytest.fixture
def server(monkeypatch, tmp_path):
    """The test files served on 127.0.0.1, pinned, with a fresh download cache."""
    pinned_to_test_files(monkeypatch)
    monkeypatch.setenv("SELMA_CACHE", str(tmp_path / "cache"))
    files = benchmark_server()
    monkeypatch.setenv("SELMA_BENCHMARK_URL", files.url)
    yield files
    files.close()


def run_folder(tmp_path, *overrides: str):
    """A run folder of the tiny demo recipe (nothing drawn or trained yet)."""
    run = load_run_recipe("tiny-demo", [*TINY, *overrides])
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    write_resolved_recipe(run, paths.root)
    return run, paths


def test_git_blob_id_is_the_one_git_computes(tmp_path):
    data = FILES["dsg-1k"]
    (tmp_path / "f").write_bytes(data)
    git = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True, check=True)
    assert git_blob_id(data) == git.stdout.strip() == git_blob(data)


def test_shipped_pins_name_a_commit_and_the_files_hashes():
    assert set(table.BENCHMARK_NAMES) == {"dsg-1k", "tifa-v1", "genai-bench", "dpg-bench"}
    for spec in table.BENCHMARKS.values():
        assert re.fullmatch(r"[0-9a-f]{40}", spec.file.commit) and re.fullmatch(r"[0-9a-f]{40}", spec.file.git_blob)
        assert spec.file.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.file.sha256)
        assert (
            spec.file.url() == f"https://raw.githubusercontent.com/{spec.file.repo}/{spec.file.commit}/{spec.file.path}"
        )
        assert spec.licence and spec.citation.startswith("@") and spec.judge and spec.protocol
    assert table.BENCHMARKS["dsg-1k"].file.path == "dsg/data/dsg-1k-anns.csv"  # where it lies at the pinned commit
    assert table.BENCHMARKS["dpg-bench"].seeds == (0, 1, 2, 3)


def test_each_format_is_read_into_items_with_sources_and_questions(server):
    dsg = load_benchmark("dsg-1k")  # sources filed under DSG's categories, as its code reports them
    assert [(i.index, i.key, i.category, i.prompt) for i in dsg] == [
        (0, "whoops_5", "defying", "a red cube on a table"),
        (1, "countbench_7", "count", "two dogs"),
        (2, "midjourney_61", "real_user", "a blue ball"),
        (3, "midjourney_65", "real_user", "a blue ball"),
        (4, "posescript_69", "pose", "a man with one leg out"),
        (5, "drawtext_45", "text", "a sign saying hi"),
    ]
    assert [(q.id, q.parents) for q in dsg[0].questions] == [("1", ()), ("2", ("1",)), ("3", ())]
    # Read as DSG's code reads its flaws: no dependencies for an item with a word among them; a
    # question's own id and ids its item lacks are no parents.
    assert [(q.id, q.parents) for q in dsg[4].questions] == [("1", ()), ("2", ())]
    assert [(q.id, q.parents) for q in dsg[5].questions] == [("1", ()), ("2", ("1",))]
    tifa = load_benchmark("tifa-v1")
    assert [(i.key, i.category) for i in tifa] == [
        ("coco_301091", "coco"),
        ("drawbench_4", "drawbench"),
        ("coco_99", "coco"),
    ]
    assert tifa[0].prompt == tifa[2].prompt and tifa[0].questions != tifa[2].questions
    assert tifa[0].questions[1].choices == ("red", "blue", "green") and tifa[1].questions[0].answer == "3"
    dpg = load_benchmark("dpg-bench")
    assert [i.category for i in dpg] == ["partiprompts", "COCOval"]
    genai = load_benchmark("genai-bench")
    assert [(i.key, i.prompt, i.questions) for i in genai] == [
        ("00001", "A baker pulling bread out of an oven.", ()),
        ("00002", "Two dogs and no cat on a sofa.", ()),
    ]
    # Downloaded once: a second read uses the cached copy.
    load_benchmark("dsg-1k")
    assert set(server.requests.values()) == {1}


def test_a_changed_file_fails_its_pin_and_is_not_kept(server, monkeypatch):
    spec = table.BENCHMARKS["dsg-1k"]
    path = "/" + spec.file.url("").lstrip("/")
    server.files[path] = FILES["dsg-1k"].replace(b"Is the cube red?", b"Is the cube blue?")
    with pytest.raises(DatasetError) as caught:
        fetch_pinned("dsg-1k", spec.file)
    message = str(caught.value)
    assert server.url + path in message and "git blob id" in message and "not the file the benchmark pins" in message
    assert git_blob(server.files[path]) in message and spec.file.git_blob in message
    assert not list(cache_dir().rglob("*.csv"))
    # A sha256 pin is checked too (here the blob id is made to match the changed file).
    monkeypatch.setitem(
        table.BENCHMARKS,
        "dsg-1k",
        dataclasses.replace(spec, file=dataclasses.replace(spec.file, git_blob=git_blob(server.files[path]))),
    )
    with pytest.raises(DatasetError, match="its sha256 differs"):
        fetch_pinned("dsg-1k", table.BENCHMARKS["dsg-1k"].file)


def test_a_damaged_cached_copy_is_downloaded_again(server):
    path = fetch_pinned("dsg-1k", table.BENCHMARKS["dsg-1k"].file)
    path.write_bytes(b"item_id,text\n")
    assert fetch_pinned("dsg-1k", table.BENCHMARKS["dsg-1k"].file).read_bytes() == FILES["dsg-1k"]
    assert sum(server.requests.values()) == 2


def test_selma_evaluate_benchmark_dsg_runs_end_to_end_with_a_tiny_judge(server, tmp_path):
    from selma_toolkit.cli import app

    _, paths = run_folder(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", str(paths.root), "--benchmark", "dsg-1k"])
    assert result.exit_code == 0, result.output
    folder = paths.eval_dir / "benchmarks" / "dsg-1k"
    record = json.loads((folder / "benchmark.json").read_text())
    scores = json.loads((folder / "scores.json").read_text())
    assert record["seeds"] == [0] and record["prompts"] == {"used": 6, "total": 6}
    assert record["judge"]["model"] == "tiny:paligemma" and "mPLUG-large" in record["judge"]["authors"]
    assert record["licence"].startswith("Apache-2.0") and "Cho2024DSG" in record["citation"]
    assert record["file"]["commit"] == table.BENCHMARKS["dsg-1k"].file.commit
    # One image per prompt and seed, of the base model only (no merge yet), each scored by DSG's rule.
    assert sorted(p.relative_to(folder / "images").as_posix() for p in (folder / "images").rglob("*.png")) == [
        "base/count/000001-seed0.png",
        "base/defying/000000-seed0.png",
        "base/pose/000004-seed0.png",
        "base/real_user/000002-seed0.png",
        "base/real_user/000003-seed0.png",
        "base/text/000005-seed0.png",
    ]
    values = {item["prompt_id"]: item["scores"]["dsg-1k"] for item in scores["items"]}
    assert values[0] in (0.0, 100 / 3, 200 / 3, 100.0) and values[2] in (0.0, 100.0)
    base = record["results"]["base"]
    assert base["overall"]["mean"] == pytest.approx(sum(values.values()) / 6) and base["overall"]["n"] == 6
    assert base["sources"]["real_user"]["mean"] == pytest.approx((values[2] + values[3]) / 2)
    assert base["sources"]["defying"]["mean"] == pytest.approx(values[0])
    # What the command printed, and the report's licence and citation.
    assert "DSG-1k (Davidsonian Scene Graph): 6 of 6 prompts, seeds [0], judge tiny:paligemma" in result.output
    assert f"base: {base['overall']['mean']:.2f}" in result.output and "licence: Apache-2.0" in result.output
    report = (folder / "report" / "index.html").read_text()
    assert "Cho2024DSG" in report and "Apache-2.0" in report
    # Again: nothing drawn or scored again, nothing downloaded again.
    item_scores = (folder / "item_scores.jsonl").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png") if "report" not in p.parts}
    again = CliRunner().invoke(app, ["evaluate", str(paths.root), "--benchmark", "dsg-1k"])
    assert again.exit_code == 0, again.output
    assert (folder / "item_scores.jsonl").read_text() == item_scores
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert set(server.requests.values()) == {1}


def test_a_benchmark_number_is_the_mean_over_prompts_of_each_prompts_mean_over_its_images():
    from selma_toolkit.evaluate.benchmark_run import summarise

    def item(variant, source, prompt_id, value):
        return {"variant": variant, "skill": source, "prompt_id": prompt_id, "scores": {"m": value}}

    document = {
        "variants": ["merged:selma", "base"],
        "items": [
            item("base", "a", 0, 0.0),
            item("base", "a", 0, 100.0),
            item("base", "a", 1, 100.0),  # prompt 0: 50, 1: 100
            item("base", "b", 2, 40.0),
            item("base", "b", 2, None),  # an image the judge could not score is left out
            item("merged:selma", "a", 0, 10.0),
        ],
    }
    results = summarise(document, "m", samples=200)
    assert list(results) == ["base", "merged:selma"]
    assert results["base"]["overall"]["mean"] == pytest.approx((50 + 100 + 40) / 3)  # not the mean of 4 images
    assert results["base"]["overall"]["n"] == 3
    assert results["base"]["sources"]["a"]["mean"] == pytest.approx(75.0)
    assert results["base"]["sources"]["b"]["mean"] == pytest.approx(40.0)
    assert results["merged:selma"]["sources"] == {"a": {"mean": 10.0, "low": 10.0, "high": 10.0, "n": 1}}


def test_dpg_bench_draws_four_images_per_prompt_and_scores_a_prompt_by_their_mean(server, tmp_path):
    from selma_toolkit.evaluate.benchmark_run import evaluate_benchmark

    run, paths = run_folder(tmp_path)
    record = evaluate_benchmark(run, paths, "dpg-bench", {"base": None})
    assert record["seeds"] == [0, 1, 2, 3]
    scores = json.loads((paths.eval_dir / "benchmarks" / "dpg-bench" / "scores.json").read_text())
    per_prompt = {}
    for item in scores["items"]:
        per_prompt.setdefault(item["prompt_id"], []).append(item["scores"]["dpg-bench"])
    assert {k: len(v) for k, v in per_prompt.items()} == {0: 4, 1: 4}
    means = {k: sum(v) / 4 for k, v in per_prompt.items()}
    assert record["results"]["base"]["overall"]["mean"] == pytest.approx((means[0] + means[1]) / 2)
    assert record["results"]["base"]["sources"]["COCOval"]["mean"] == pytest.approx(means[1])
    with pytest.raises(RecipeError, match="dpg-bench draws 4 images per prompt"):
        load_run_recipe("tiny-demo", ["evaluate.benchmark='dpg-bench'", "evaluate.benchmark_seeds=[0]"])
    with pytest.raises(DatasetError, match="needs 4 seeds, not 2"):
        evaluate_benchmark(
            load_run_recipe("tiny-demo", [*TINY, "evaluate.benchmark_seeds=[0, 1]"]), paths, "dpg-bench", {"base": None}
        )


def test_genai_bench_scores_vqascore_on_the_whole_prompt(server, tmp_path):
    from PIL import Image

    from selma_toolkit.evaluate import build_scorer
    from selma_toolkit.evaluate.benchmark_run import evaluate_benchmark
    from selma_toolkit.recipe import EvaluateSettings

    run, paths = run_folder(tmp_path)
    record = evaluate_benchmark(run, paths, "genai-bench", {"base": None})
    folder = paths.eval_dir / "benchmarks" / "genai-bench"
    scores = json.loads((folder / "scores.json").read_text())
    vqascore = build_scorer("vqascore", EvaluateSettings(scorers=["vqascore"], vqa_model="tiny:paligemma"))
    for item in scores["items"]:
        with Image.open(folder / item["image"]) as image:
            assert item["scores"]["genai-bench"] == pytest.approx(
                vqascore.score([image.convert("RGB")], [item["prompt"]])[0], rel=1e-5
            )
    assert record["results"]["base"]["sources"].keys() == {"all"}


def test_tifa_scores_each_image_by_its_items_questions_where_items_share_a_caption(server, tmp_path):
    from PIL import Image

    from selma_toolkit.evaluate import build_scorer
    from selma_toolkit.evaluate.benchmark_run import evaluate_benchmark
    from selma_toolkit.evaluate.vqa import dsg_score
    from selma_toolkit.recipe import EvaluateSettings

    run, paths = run_folder(tmp_path)
    evaluate_benchmark(run, paths, "tifa-v1", {"base": None})
    folder = paths.eval_dir / "benchmarks" / "tifa-v1"
    items = {item.index: item for item in load_benchmark("tifa-v1")}
    # The same judge, asked each item's own questions about its image, independently of the benchmark's scorer.
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "x", "question": "q"}\n')
    judge = build_scorer(
        "questions", EvaluateSettings(scorers=["questions"], questions=str(path), vqa_model="tiny:blip2")
    )
    scored = json.loads((folder / "scores.json").read_text())["items"]
    assert sorted(item["prompt_id"] for item in scored) == [0, 1, 2]
    for item in scored:
        questions = list(items[item["prompt_id"]].questions)
        with Image.open(folder / item["image"]) as image:
            answers = judge.answers(image.convert("RGB"), questions)
        assert item["scores"]["tifa-v1"] == pytest.approx(dsg_score(questions, answers)[0])


def test_the_recipes_benchmark_is_a_stage_done_until_its_settings_change(server, tmp_path):
    from selma_toolkit.stages import RunContext, load_stages
    from selma_toolkit.stages.benchmark import BenchmarkStage

    run, paths = run_folder(tmp_path, "evaluate.benchmark='tifa-v1'", "evaluate.benchmark_prompts=1")
    assert [type(s).__name__ for s in load_stages()][-2:] == ["EvaluateStage", "BenchmarkStage"]
    stage, ctx = BenchmarkStage(), RunContext(run, paths)
    assert stage.targets(ctx) == ["tifa-v1"]
    assert stage.state(ctx, "tifa-v1").detail == "waits for the experts"
    for skill in run.skills:  # the experts' files (the benchmark draws base and the merges, none here yet)
        paths.expert(skill.name).parent.mkdir(parents=True, exist_ok=True)
        paths.expert(skill.name).write_bytes(b"")
    assert not stage.state(ctx, "tifa-v1").done
    stage.run(ctx, "tifa-v1", lambda label, done, total: None)
    assert stage.state(ctx, "tifa-v1").done
    record = json.loads((paths.eval_dir / "benchmarks" / "tifa-v1" / "benchmark.json").read_text())
    assert record["prompts"] == {"used": 1, "total": 3} and "not a result to compare" in record["comparability"]
    other = load_run_recipe(
        "tiny-demo",
        [*TINY, "evaluate.benchmark='tifa-v1'", "evaluate.benchmark_prompts=1", "evaluate.benchmark_seeds=[0, 1]"],
    )
    assert not stage.state(RunContext(other, paths), "tifa-v1").done
    wants_merge = load_run_recipe("tiny-demo", [*TINY, "evaluate.benchmark_variants=['base', 'merged:selma']"])
    with pytest.raises(DatasetError, match="no merged:selma yet"):
        stage.run(RunContext(wants_merge, paths), "tifa-v1", lambda *args: None)
