"""`selma prompts` as a user runs it: resume after kill -9, run recipes, errors, the API key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import tomli_w
from support_llm import Fail, ScriptedLLM, skill_data

from selma_toolkit.dataset import read_prompts
from selma_toolkit.io import read_jsonl
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.recipe import skill_recipe_from_dict

MARKER_KEY = "sk-selma-marker-5f3a9c1e7b"


def write_skill(path, url, **changes):
    path.write_text(tomli_w.dumps(skill_data(url, **changes)))
    return path


def test_resume_after_kill_keeps_every_prompt_once(tmp_path):
    server = ScriptedLLM(delay=0.15).start()  # slow answers, so the kill lands mid-run
    try:
        recipe = write_skill(tmp_path / "skill.toml", server.url, num_prompts=60)
        out = tmp_path / "run"
        env = {**os.environ, "SELMA_CACHE": str(tmp_path / "cache")}
        command = [sys.executable, "-m", "selma_toolkit", "prompts", str(recipe), "--out", str(out)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prompts = out / "prompts.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if prompts.exists() and prompts.read_text().count("\n") >= 12:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        at_kill = read_jsonl(prompts, repair_tail=True)
        assert 12 <= len(at_kill) < 60, "the kill must land mid-run"

        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        records = read_jsonl(prompts)
        assert [r["id"] for r in records] == list(range(60))
        assert len({r["prompt"] for r in records}) == 60
        assert records[: len(at_kill)] == at_kill  # nothing written before the kill is lost or changed

        # The same run without a kill (its own cache; the scripted LLM answers each request the
        # same way every time) writes the same file: resuming changed nothing.
        reference = tmp_path / "reference.jsonl"
        generate_prompts(
            skill_recipe_from_dict(skill_data(server.url, num_prompts=60)),
            reference,
            cache_dir=tmp_path / "reference-cache",
        )
        assert read_jsonl(reference) == records
    finally:
        server.stop()


def test_run_recipe_writes_each_skill_with_heldout_prompts_and_the_resolved_recipe(cli, tmp_path):
    result = cli("prompts", "tiny-demo", "--out", str(tmp_path), "--set", "evaluate.prompts_per_skill=3")
    assert result.returncode == 0, result.stderr
    for skill in ("count-grammar", "spatial-grammar", "color-grammar"):
        path = tmp_path / "skills" / skill / "prompts.jsonl"
        assert len(read_prompts(path, split="train")) == 16 and len(read_prompts(path, split="heldout")) == 3
        assert skill in result.stdout
    assert (tmp_path / "recipe.toml").is_file() and "prompts_per_skill = 3" in (tmp_path / "recipe.toml").read_text()
    assert "16/16" not in result.stdout and "19/19" in result.stdout  # the summary table counts train + held-out

    only = cli("prompts", "tiny-demo", "--skill", "spatial-grammar", "--out", str(tmp_path / "one"))
    assert only.returncode == 0, only.stderr
    assert [p.name for p in (tmp_path / "one" / "skills").iterdir()] == ["spatial-grammar"]


def test_api_key_never_appears_in_logs_outputs_or_the_cache(cli, scripted_llm, tmp_path):
    recipe = write_skill(tmp_path / "skill.toml", scripted_llm.url, llm={"max_retries": 1})
    env = {"SELMA_TEST_LLM_KEY": MARKER_KEY, "SELMA_CACHE": str(tmp_path / "cache"), "OPENAI_LOG": "debug"}
    scripted_llm.then(Fail(500), Fail(429, {"Retry-After": "0.1"}))
    ok = cli("-v", "prompts", str(recipe), "--out", str(tmp_path / "ok"), env=env)
    assert ok.returncode == 0, ok.stderr
    scripted_llm.then(*[Fail(401)] * 5)
    refused = cli(
        "-v",
        "prompts",
        str(recipe),
        "--out",
        str(tmp_path / "refused"),
        env={**env, "SELMA_CACHE": str(tmp_path / "cache-2")},
    )  # no cached answers: it must ask
    assert refused.returncode == 1 and "refused the API key from $SELMA_TEST_LLM_KEY" in refused.stderr
    assert all(r.authorization == f"Bearer {MARKER_KEY}" for r in scripted_llm.requests)  # the key was used
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "prompts.jsonl" for p in written) and any("cache" in p.parts for p in written)
    for text in [
        ok.stdout,
        ok.stderr,
        refused.stdout,
        refused.stderr,
        *(p.read_text(errors="replace") for p in written),
    ]:
        assert MARKER_KEY not in text and MARKER_KEY[-8:] not in text


def test_missing_key_is_a_clear_error_without_traceback(cli, tmp_path):
    recipe = write_skill(tmp_path / "skill.toml", "https://llm.invalid/v1", llm={"api_key_env": "SELMA_UNSET_KEY_VAR"})
    result = cli("prompts", str(recipe), "--out", str(tmp_path / "out"), env={"SELMA_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "SELMA_UNSET_KEY_VAR is not set" in result.stderr
    assert not (tmp_path / "out" / "prompts.jsonl").exists()


def test_recipe_accepts_exactly_the_registered_prompt_sources():
    """The recipe's source names are the registry's: a source added to PROMPT_SOURCES is accepted."""
    from typing import get_args

    from selma_toolkit.config.registries import PROMPT_SOURCES
    from selma_toolkit.recipe import PromptSourceName

    assert set(get_args(PromptSourceName)) == set(PROMPT_SOURCES)
