"""The published benchmarks' prompts and questions: downloaded on first use from their public
repositories at the pinned commit (config/benchmarks.py), checked against the pinned hashes, cached
under ``$SELMA_CACHE/benchmarks/<name>/<commit>/`` and read by the question readers (questions.py).

The files are served by ``https://raw.githubusercontent.com``; the environment variable
``SELMA_BENCHMARK_URL`` (or the ``benchmark_url`` argument) names another server with the same layout
(``<base>/<owner>/<repo>/<commit>/<path>``), e.g. a mirror inside a network without GitHub. A file
is used only if its bytes have the pinned git blob id and, where pinned, sha256, whoever served it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from selma_toolkit.config.benchmarks import BENCHMARK_NAMES, BENCHMARKS, Benchmark, PinnedFile
from selma_toolkit.errors import DatasetError, Option, Remedy
from selma_toolkit.evaluate.questions import Question, read_questions
from selma_toolkit.io import atomic_write_bytes
from selma_toolkit.tiny import cache_dir

log = logging.getLogger(__name__)

RAW_BASE = "https://raw.githubusercontent.com"
URL_VARIABLE = "SELMA_BENCHMARK_URL"
DOWNLOAD_TIMEOUT_S = 120


@dataclass(frozen=True)
class BenchmarkItem:
    """One prompt of a benchmark: its place in the file (the prompt id of its images), its own id,
    text, source category and questions (none for a prompts-only benchmark)."""

    index: int
    key: str
    prompt: str
    category: str
    questions: tuple[Question, ...] = ()


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``."""
    if name not in BENCHMARKS:
        raise DatasetError(
            what=f"unknown benchmark {name!r}",
            where=Option("benchmark"),
            found=name,
            expected=", ".join(BENCHMARK_NAMES),
        )
    return BENCHMARKS[name]


def base_url(benchmark_url: str | None = None) -> str:
    """Where the files are fetched from: ``benchmark_url``, else ``$SELMA_BENCHMARK_URL``, else GitHub's raw files."""
    return benchmark_url or os.environ.get(URL_VARIABLE) or RAW_BASE


def git_blob_id(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def check_pinned(data: bytes, pinned: PinnedFile, source: str) -> None:
    """Refuse bytes whose git blob id or (where pinned) sha256 differ from the pin."""
    checks = [("git blob id", git_blob_id(data), pinned.git_blob)]
    if pinned.sha256 is not None:
        checks.append(("sha256", hashlib.sha256(data).hexdigest(), pinned.sha256))
    for label, actual, expected in checks:
        if actual != expected:
            raise DatasetError(
                what=f"this is not the file the benchmark pins ({pinned.repo} {pinned.path} at commit "
                f"{pinned.commit[:12]}): its {label} differs, so it is not used",
                where=source,
                found=f"{label} {actual}",
                expected=f"{label} {expected}",
                remedies=[Remedy.check("benchmark_url", "mirror")],
            )


def fetch_pinned(name: str, pinned: PinnedFile, benchmark_url: str | None = None) -> Path:
    """The local copy of a benchmark's pinned file, downloaded once and checked every time it is read."""
    path = cache_dir() / "benchmarks" / name / pinned.commit / Path(pinned.path).name
    if path.is_file():
        try:
            check_pinned(path.read_bytes(), pinned, str(path))
            return path
        except DatasetError:
            log.warning("%s: the cached copy differs from the pinned file; downloading it again", path)
    url = pinned.url(base_url(benchmark_url))
    log.info("downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": "selma-toolkit"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(
            what=f"could not download the {name} benchmark's {Path(pinned.path).name} ({exc})",
            where=url,
            remedies=[Remedy.do("check the network connection and try again"), Remedy.check("benchmark_url", "mirror")],
        ) from None
    check_pinned(data, pinned, url)
    atomic_write_bytes(path, data)
    return path


def source_category(key: str, categories: Mapping[str, str] | None = None) -> str:
    """A prompt's category from its benchmark id: its source (``whoops_5`` -> ``whoops``,
    ``COCOval2014000000014635`` -> ``COCOval``, ``partiprompts115`` -> ``partiprompts``; an id of
    digits only -> ``numbered``), or the category ``categories`` files that source under."""
    source = re.sub(r"_?\d+$", "", key) or "numbered"
    return (categories or {}).get(source, source)


def load_benchmark(name: str, benchmark_url: str | None = None) -> list[BenchmarkItem]:
    """Every prompt of benchmark ``name`` in its file's order, with its questions."""
    spec = get_benchmark(name)
    path = fetch_pinned(name, spec.file, benchmark_url)
    if spec.kind == "prompts":
        return _genai_prompts(path)
    questions = read_questions(path, item_column=spec.item_column, as_published=True)
    return [
        BenchmarkItem(index, key, prompt, source_category(key, spec.categories), tuple(qs))
        for index, (key, (prompt, qs)) in enumerate(questions.items.items())
    ]


def _genai_prompts(path: Path) -> list[BenchmarkItem]:
    """GenAI-Bench's ``genai_image.json``: ``{"00001": {"id", "prompt", ...}, ...}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [(str(key), str(value["prompt"]).strip()) for key, value in data.items()]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise DatasetError(
            what=f"not a GenAI-Bench prompt file ({exc})", where=str(path), expected='{"00001": {"prompt": ...}, ...}'
        ) from None
    return [BenchmarkItem(index, key, prompt, "all") for index, (key, prompt) in enumerate(entries)]
