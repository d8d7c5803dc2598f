"""Secrets never leave the environment (issue 22, item 3): with marker values in OPENAI_API_KEY,
HF_TOKEN and HUGGING_FACE_HUB_TOKEN, a whole `selma run` (tiny-demo made small, debug logging on),
`selma status` and the Hub upload a push would make (files and model card, planned offline) hold
none of them: not in any file under the run folder, the answer and Hub caches, the logs, the card
or a LoRA's metadata. (The LLM path, where the key is sent to an endpoint, is checked the same way
in test_prompts_cli.py::test_api_key_never_appears_in_logs_outputs_or_the_cache.)"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from conftest import TINY_RUN_SKILLS, run_cli, small_tiny_run

from selma_toolkit.hub.card import plan_upload

SKILLS = TINY_RUN_SKILLS
SMALL_RUN = small_tiny_run(train_steps=2)
SECRETS = {
    "OPENAI_API_KEY": "sk-selmaTestMarkerOpenAI0123456789",
    "HF_TOKEN": "hf_selmaTestMarkerHubToken0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_selmaTestMarkerOldHubVar0123456789",
}


def forms(secret: str) -> list[bytes]:
    """What a leak could look like in a file: the value, its tail (a masked key shows the end),
    its base64 (an Authorization header or a config dump)."""
    raw = secret.encode()
    return [
        raw,
        raw[-12:],
        *(base64.b64encode(b"x" * shift + raw)[4:-4] if shift else base64.b64encode(raw) for shift in range(3)),
    ]


def leaks(data: bytes) -> list[str]:
    return [name for name, secret in SECRETS.items() if any(form in data for form in forms(secret))]


def test_leak_check_finds_a_planted_secret_in_each_form_it_looks_for():
    for name, secret in SECRETS.items():
        for form in forms(secret):
            assert leaks(b"...header..." + form + b"...") == [name]
    assert leaks(b'api_key_env = "OPENAI_API_KEY"') == []  # the variable's name is not its value


@pytest.fixture(scope="module")
def run_with_secrets(tmp_path_factory):
    home = tmp_path_factory.mktemp("secrets")
    root = home / "run"
    env = {**SECRETS, "SELMA_CACHE": str(home / "selma-cache"), "HF_HOME": str(home / "hf-home")}
    args = ["-v", "run", "tiny-demo", "--out", str(root)]
    for override in SMALL_RUN:
        args += ["--set", override]
    run = run_cli(*args, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    status = run_cli("status", str(root), env=env)
    assert status.returncode == 0 and "the run is complete" in status.stdout
    return {"home": home, "root": root, "outputs": [run.stdout, run.stderr, status.stdout, status.stderr]}


def test_no_file_written_by_a_run_holds_a_secret_from_the_environment(run_with_secrets):
    written = [p for p in run_with_secrets["home"].rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".safetensors", ".jsonl", ".toml", ".json", ".html", ".png"} <= kinds  # every kind of output was made
    leaked = {str(p): leaks(p.read_bytes()) for p in written}
    assert not {path: names for path, names in leaked.items() if names}


def test_no_log_or_console_output_of_a_run_holds_a_secret(run_with_secrets):
    run_stdout, run_stderr, _, _ = run_with_secrets["outputs"]
    assert "DEBUG" in run_stderr and "merged LoRA" in run_stdout  # debug logging was on: the most a log says
    for text in run_with_secrets["outputs"]:
        assert not leaks(text.encode())


def test_a_push_of_the_run_would_upload_no_secret_in_files_metadata_or_model_card(run_with_secrets, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    plan = plan_upload(run_with_secrets["root"], "someone/tiny-demo")
    assert "README.md" in plan.files and any(name.startswith("merged/") for name in plan.files)
    for name, content in plan.files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        assert not leaks(data), name
    assert not leaks((plan.commit_message + plan.commit_description).encode())
    for secret in SECRETS.values():
        plan.refuse_if_contains(secret)  # the push's own guard agrees
