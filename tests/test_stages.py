"""The Stage protocol and the one ordered list of stages (config/registries.py STAGES) that
`selma run`, `selma status` and the run checks iterate: listing stages imports none, the order
is one where each stage reads what earlier stages wrote, and a stage added to the list is run,
shown and checked without any other change."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from selma_toolkit.config import registries
from selma_toolkit.errors import RecipeError
from selma_toolkit.io import atomic_write_text
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import load_run_recipe
from selma_toolkit.run import check_recipe_change, run_pipeline, run_status
from selma_toolkit.stages import RunContext, Stage, StageState, load_stages


def test_listing_the_stages_imports_no_stage():
    code = (
        "import sys; from selma_toolkit.config.registries import STAGES; assert len(STAGES) == 10; "
        "loaded = [m for m in sys.modules if m.startswith('selma_toolkit.stages')]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_stage_reads_only_what_the_stages_before_it_write(tmp_path):
    run = load_run_recipe(
        "tiny-demo",
        [
            "joint=true",
            "dpo.enabled=true",
            "moe.enabled=true",
            "evaluate.select_checkpoints=true",
            "evaluate.benchmark='dsg-1k'",
        ],
    )
    ctx = RunContext(run, RunPaths(tmp_path / "run"))
    written: list[Path] = []
    for stage in load_stages():
        targets = stage.targets(ctx)
        assert targets, f"{type(stage).__name__}: the recipe enables every stage"
        for target in targets:
            for path in stage.inputs(ctx, target):
                assert any(path == out or out in path.parents for out in written), (type(stage).__name__, target, path)
        for target in targets:
            outputs = stage.outputs(ctx, target)
            assert outputs and all(ctx.paths.root in path.parents for path in outputs), (type(stage).__name__, outputs)
            written += outputs


class PromptCountStage(Stage):
    """An example stage, as docs/architecture.md adds one: the number of train prompts of each
    skill in ``<run>/counts/<skill>.json``, which depends on the skill's ``seed``."""

    name = "count"

    def targets(self, ctx: RunContext) -> list[str]:
        return [s.name for s in ctx.run.skills]

    def outputs(self, ctx: RunContext, skill: str) -> list[Path]:
        return [ctx.paths.root / "counts" / f"{skill}.json"]

    def state(self, ctx: RunContext, skill: str) -> StageState:
        done = self.outputs(ctx, skill)[0].is_file()
        return StageState(self.name, skill, done, "counted" if done else "not counted yet")

    def run(self, ctx: RunContext, skill: str, progress) -> None:
        recipe = ctx.run.skill(skill)
        atomic_write_text(self.outputs(ctx, skill)[0], json.dumps({"train": recipe.num_prompts, "seed": recipe.seed}))
        progress(f"count {skill}", 1, 1)

    def recipe_changes(self, old, new, paths: RunPaths) -> list[str]:
        before = {s.name: s.seed for s in old.skills}
        return [
            f"skills.{s.name}.seed: {before[s.name]} -> {s.seed} (counts exist for {s.name})"
            for s in new.skills
            if s.name in before and before[s.name] != s.seed and (paths.root / "counts" / f"{s.name}.json").is_file()
        ]


@pytest.fixture
def only_the_example_stage(monkeypatch):
    """STAGES holding the example stage alone, from a module of its own (one list entry)."""
    module = types.ModuleType("example_stage")
    module.PromptCountStage = PromptCountStage
    monkeypatch.setitem(sys.modules, "example_stage", module)
    monkeypatch.setattr(registries, "STAGES", ("example_stage:PromptCountStage",))
    monkeypatch.setattr("selma_toolkit.stages.STAGES", registries.STAGES)


def test_a_stage_added_to_the_list_is_run_shown_and_checked(only_the_example_stage, tmp_path):
    paths = RunPaths(tmp_path / "run")
    run = load_run_recipe("tiny-demo")
    skills = [s.name for s in run.skills]
    assert [(s.stage, s.target, s.done) for s in run_status(run, paths)] == [
        ("count", skill, False) for skill in skills
    ]

    seen, shown = [], []
    run_pipeline(
        run,
        paths,
        on_stage=lambda state, action: seen.append((state.target, action)),
        progress=lambda label, done, total: shown.append(label),
    )
    assert seen == [(skill, action) for skill in skills for action in ("start", "done")]
    assert shown == [f"count {skill}" for skill in skills]
    assert json.loads((paths.root / "counts" / f"{skills[0]}.json").read_text()) == {"train": 16, "seed": 0}
    assert all(state.done for state in run_status(run, paths))

    seen.clear()
    run_pipeline(run, paths, on_stage=lambda state, action: seen.append((state.target, action)))
    assert seen == [(skill, "skip") for skill in skills]  # complete: skipped
    changed = load_run_recipe("tiny-demo", [f"skills.{skills[0]}.seed=5"])
    with pytest.raises(RecipeError, match=rf"skills\.{skills[0]}\.seed: 0 -> 5 \(counts exist for {skills[0]}\)"):
        check_recipe_change(changed, paths)
    assert not (paths.root / "skills").exists()  # no other stage ran
