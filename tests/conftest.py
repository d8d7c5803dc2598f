"""Shared fixtures. Tiny models are built once per session; nothing touches the network or the
user's ~/.cache (SELMA_CACHE and HF_HOME point into a session temporary folder)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="selma-tests-"))
os.environ.setdefault("SELMA_CACHE", str(_SESSION_HOME / "selma-cache"))
os.environ.setdefault("HF_HOME", str(_SESSION_HOME / "hf-home"))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch CPU thread in this process and in every `selma` subprocess a test starts (they inherit
# the environment): the tiny models' ops are so small that a second thread only adds
# synchronisation, on a shared 2-core machine an oversubscribed thread pool makes them several
# times slower, and bit-for-bit comparisons across processes need the same thread count (CPU
# kernels round differently with another one, about 1e-6).
os.environ["OMP_NUM_THREADS"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
# Test-support modules (local servers, builders) live beside the tests as tests/support_*.py;
# with --import-mode=importlib they are importable only through this path entry.
sys.path.insert(0, str(Path(__file__).resolve().parent))


# The node-pack tests' fixtures (a FAKE loras folder, meta-device models, FAKE comfy modules): tests/support_nodes.py.
from support_nodes import loras, models, sd15_comfy  # noqa: E402, F401


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # OMP_NUM_THREADS above is read when torch loads; this also covers a torch imported earlier.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


class TinyModels(Mapping):
    """Tiny models of every family in the diffusers folder layout, each built the first time a test
    asks for it (a session that tests one family builds one)."""

    def __init__(self, root: Path):
        from selma_toolkit.tiny import ARCHITECTURES

        self.root, self.names, self.built = root, ARCHITECTURES, {}

    def __getitem__(self, arch: str) -> Path:
        if arch not in self.names:
            raise KeyError(arch)
        if arch not in self.built:
            from selma_toolkit.tiny import create_tiny_model

            self.built[arch] = create_tiny_model(self.root / arch, arch)
        return self.built[arch]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> TinyModels:
    """Tiny models of every family (sd1 ... flux2-klein) in the diffusers folder layout, each built
    once per session on first use."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_sd1(tiny_model_dirs) -> Path:
    return tiny_model_dirs["sd1"]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout: float = 600):
    """Run the `selma` CLI in a subprocess (as a user would) and return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "selma_toolkit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def scripted_llm():
    """A scripted LLM (tests/support_llm.py: a real OpenAI-compatible HTTP server on 127.0.0.1
    answering from a script), started for one test and stopped after it."""
    from support_llm import ScriptedLLM

    server = ScriptedLLM().start()
    yield server
    server.stop()


TINY_RUN_SKILLS = ("count-grammar", "spatial-grammar", "color-grammar")


def small_tiny_run(train_steps: int = 2) -> list[str]:
    """--set overrides that make the tiny-demo recipe a seconds-long `selma run` (every stage, 2 prompts a skill)."""
    return [
        "images.resolution=32",
        "images.steps=2",
        "images.batch_size=4",
        f"train.steps={train_steps}",
        "train.checkpoint_every=2",
        "train.batch_size=2",
        *[f"skills.{skill}.num_prompts=2" for skill in TINY_RUN_SKILLS],
        "evaluate.prompts_per_skill=1",
        "evaluate.bootstrap_samples=100",
        "evaluate.select_checkpoints=false",
        "evaluate.report_prompts_per_skill=1",
    ]
