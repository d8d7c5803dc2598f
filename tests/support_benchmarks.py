"""Benchmark files for tests: small files in each published format (DSG-1k's and DPG-Bench's CSV,
TIFA v1.0's question JSON, GenAI-Bench's prompt JSON), served by a real HTTP server on 127.0.0.1 in
the raw.githubusercontent.com layout (``/<owner>/<repo>/<commit>/<path>``), and the benchmark table
pinned to them (the shipped pins name the published files, which these are not)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DSG_HEADER = [
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
]


def dsg_csv(rows: list[tuple[str, str, int, str, str]]) -> bytes:
    """DSG-1k / DPG-Bench annotation CSV: (item_id, text, proposition_id, dependency, question) rows."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(DSG_HEADER)
    for item, text, number, dependency, question in rows:
        writer.writerow([item, text, "k", number, dependency, "entity", "whole", "entity - whole (k)", question])
    return out.getvalue().encode()


DSG_FILE = dsg_csv(
    [
        ("whoops_5", "a red cube on a table", 1, "0", "Is there a cube?"),
        ("whoops_5", "a red cube on a table", 2, "1", "Is the cube red?"),
        ("whoops_5", "a red cube on a table", 3, "0", "Is there a table?"),
        ("countbench_7", "two dogs", 1, "0", "Are there dogs?"),
        ("countbench_7", "two dogs", 2, "1", "Are there two dogs?"),
        # Two items with the same text and questions, as midjourney_61 and midjourney_65 in DSG-1k.
        ("midjourney_61", "a blue ball", 1, "0", "Is there a ball?"),
        ("midjourney_65", "a blue ball", 1, "0", "Is there a ball?"),
        # DSG-1k's flaws: a word among the parents (posescript_69: "5, right"), which takes the item's
        # dependencies away in DSG's code; a question depending on itself; a parent the item lacks.
        ("posescript_69", "a man with one leg out", 1, "0", "Is there a man?"),
        ("posescript_69", "a man with one leg out", 2, "1, right", "Is a leg out to the right?"),
        ("drawtext_45", "a sign saying hi", 1, "1", "Is there a sign?"),
        ("drawtext_45", "a sign saying hi", 2, "1,7", "Does the sign say hi?"),
    ]
)
DPG_FILE = dsg_csv(
    [
        ("partiprompts12", "a green car next to a tree", 1, "0", "Is there a car?"),
        ("partiprompts12", "a green car next to a tree", 2, "1", "Is the car green?"),
        ("COCOval2014000000014635", "a cat on a bed", 1, "0", "Is there a cat?"),
    ]
)
TIFA_FILE = json.dumps(
    [
        {
            "id": "coco_301091",
            "caption": "a red cube",
            "question": "is this a cube?",
            "choices": ["yes", "no"],
            "answer": "yes",
            "element_type": "object",
            "element": "cube",
        },
        {
            "id": "coco_301091",
            "caption": "a red cube",
            "question": "what color is the cube?",
            "choices": ["red", "blue", "green"],
            "answer": "red",
            "element_type": "color",
            "element": "red",
        },
        {
            "id": "drawbench_4",
            "caption": "three cats",
            "question": "how many cats are there?",
            "choices": ["1", "2", "3", "4"],
            "answer": "3",
            "element_type": "counting",
            "element": "3",
        },
        # Another item with the same caption and other questions, as two of TIFA v1.0's captions.
        {
            "id": "coco_99",
            "caption": "a red cube",
            "question": "is the cube blue?",
            "choices": ["yes", "no"],
            "answer": "no",
            "element_type": "color",
            "element": "blue",
        },
    ],
    indent=4,
).encode()
GENAI_FILE = json.dumps(
    {
        "00001": {"id": "00001", "prompt": "A baker pulling bread out of an oven.", "models": {}},
        "00002": {"id": "00002", "prompt": "Two dogs and no cat on a sofa.", "models": {}},
    },
    indent=4,
).encode()
FILES = {"dsg-1k": DSG_FILE, "dpg-bench": DPG_FILE, "tifa-v1": TIFA_FILE, "genai-bench": GENAI_FILE}


def git_blob(data: bytes) -> str:
    """git's blob id, written out here from git's object format ("blob <size>\\0" + bytes, SHA-1)."""
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def pinned_to_test_files(monkeypatch) -> None:
    """Point every benchmark of the table at its test file's hashes (same repository, commit and path)."""
    from selma_toolkit.config import benchmarks

    for name, data in FILES.items():
        spec = benchmarks.BENCHMARKS[name]
        file = dataclasses.replace(spec.file, git_blob=git_blob(data), sha256=hashlib.sha256(data).hexdigest())
        monkeypatch.setitem(benchmarks.BENCHMARKS, name, dataclasses.replace(spec, file=file))


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; counts requests per path; 404 otherwise."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] += 1
                body = server.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def benchmark_server() -> FileServer:
    """A server holding every test file where the pinned URL puts it."""
    from selma_toolkit.config.benchmarks import BENCHMARKS

    return FileServer({"/" + BENCHMARKS[name].file.url("").lstrip("/"): data for name, data in FILES.items()})
