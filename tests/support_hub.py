"""Local Hugging Face Hub servers for the hub tests.

* :class:`OlahHub` runs olah (a real Hub mirror, MIT) offline over bare git repositories in a folder:
  it answers the client's read calls (revision info, resolve, etag) exactly as a mirror does.
* :class:`HubWriteStandIn` is a STAND-IN, not a Hub: the smallest HTTP server that implements the
  write routes ``huggingface_hub`` calls for ``create_repo`` / ``create_branch`` / ``create_commit``
  (create, branch, validate-yaml, preupload answering uploadMode "regular", commit). It stores every
  commit as a real git commit in the same folder olah serves, so a push through the stand-in can be
  pulled back through olah. It records every request so tests can check what the client sent.
* :class:`HostileListing` answers one read route with file names a malicious server might send.

Everything binds 127.0.0.1, and every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import yaml
from support_servers import send_json, stop_process

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "stand-in",
    "GIT_AUTHOR_EMAIL": "stand-in@127.0.0.1",
    "GIT_COMMITTER_NAME": "stand-in",
    "GIT_COMMITTER_EMAIL": "stand-in@127.0.0.1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------ git repos


def _git(repo: Path, *args: str, data: bytes | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", f"--git-dir={repo}", *args],
        input=data,
        capture_output=True,
        check=True,
        timeout=60,
        env={**os.environ, **GIT_IDENTITY, **(env or {})},
    )
    return result.stdout.decode().strip()


def init_repo(mirrors: Path, repo_id: str) -> Path:
    """A bare git repository where olah looks for the model repo ``repo_id``."""
    path = mirrors / "models" / repo_id
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True, timeout=60)
    return path


def head(repo: Path, branch: str = "main") -> str | None:
    try:
        return _git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{branch}")
    except subprocess.CalledProcessError:
        return None


def commit_files(repo: Path, files: dict[str, bytes], message: str, branch: str = "main") -> str:
    """Commit ``files`` (path in repo -> bytes) on top of ``branch`` with git plumbing; return the sha."""
    parent = head(repo, branch)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(repo, "read-tree", *([parent] if parent else ["--empty"]), env=env)
        lines = []
        for path, data in files.items():
            blob = _git(repo, "hash-object", "-w", "--stdin", data=data)
            lines.append(f"100644 {blob}\t{path}\n")
        _git(repo, "update-index", "--index-info", data="".join(lines).encode(), env=env)
        tree = _git(repo, "write-tree", env=env)
    commit = _git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
    _git(repo, "update-ref", f"refs/heads/{branch}", commit)
    return commit


def repo_file(repo: Path, revision: str, path: str) -> bytes:
    return subprocess.run(
        ["git", f"--git-dir={repo}", "show", f"{revision}:{path}"], capture_output=True, check=True, timeout=60
    ).stdout


def repo_files(repo: Path, revision: str = "main") -> list[str]:
    return _git(repo, "ls-tree", "-r", "--name-only", revision).splitlines()


def commit_count(repo: Path, revision: str = "main") -> int:
    return int(_git(repo, "rev-list", "--count", revision))


# ----------------------------------------------------------------------------------------- olah


class OlahHub:
    """olah serving the bare repositories under ``root/mirrors`` offline on 127.0.0.1."""

    READY_REPO = "selma-tests/ready"

    def __init__(self, root: Path):
        self.root = root
        self.mirrors = root / "mirrors"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> OlahHub:
        # The readiness probe needs one repository (GET / answers 500 on an offline mirror).
        ready = init_repo(self.mirrors, self.READY_REPO)
        commit_files(ready, {"README.md": b"ready\n"}, "ready")
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            # Branch -> commit answers must follow new pushes at once.
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n"
        )
        self._log = open(self.root / "olah.log", "wb")  # noqa: SIM115 - the server's log, closed by stop()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "-c", str(config)],
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        url = f"{self.endpoint}/api/models/{self.READY_REPO}/revision/main"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not become ready at {url}; log:\n{(self.root / 'olah.log').read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self._process, timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


# ------------------------------------------------------------------------------ write stand-in


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    server: HubWriteStandIn

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        send_json(self, status, payload, headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._reply(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append(Received(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.route(self, method, path, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def route(self, handler: _Handler, method: str, path: str, body: bytes) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class HubWriteStandIn(_Server):
    """STAND-IN for the Hub's write API: create repo, create branch, validate-yaml, preupload
    (always uploadMode "regular", so no LFS), commit. Commits land as git commits in ``mirrors``."""

    def __init__(self, mirrors: Path, token: str):
        super().__init__()
        self.mirrors = mirrors
        self.token = token
        self.private: dict[str, bool] = {}

    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def route(self, handler: _Handler, method: str, path: str, body: bytes) -> None:
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            return handler._error(401, "Invalid credentials in Authorization header")
        if method == "POST" and path == "/api/repos/create":
            return self._create(handler, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(handler, json.loads(body))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if method != "POST" or match is None:
            return handler._error(404, f"the stand-in has no route {method} {path}")
        repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3))
        repo = self.repo_path(repo_id)
        if not repo.is_dir():
            return handler._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        if action == "branch":
            return self._branch(handler, repo, revision, json.loads(body or b"{}"))
        if head(repo, revision) is None:
            return handler._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if action == "preupload":
            files = json.loads(body)["files"]
            return handler._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]
                },
            )
        return self._commit(handler, repo_id, repo, revision, body)

    def _create(self, handler: _Handler, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        repo = self.repo_path(repo_id)
        if repo.exists():
            return handler._reply(409, {"error": "You already created this model repo", "url": url})
        init_repo(self.mirrors, repo_id)
        # Like the Hub: a new repo starts with one commit holding .gitattributes.
        commit_files(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
        self.private[repo_id] = payload.get("visibility") == "private" or bool(payload.get("private"))
        handler._reply(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, handler: _Handler, payload: dict) -> None:
        match = re.match(r"\s*---\n(.*?)\n---", payload["content"], flags=re.S)
        try:
            yaml.safe_load(match.group(1) if match else "")
        except yaml.YAMLError as exc:
            return handler._reply(400, {"errors": [{"message": str(exc)}]})
        handler._reply(200, {"errors": [], "warnings": []})

    def _branch(self, handler: _Handler, repo: Path, branch: str, payload: dict) -> None:
        if head(repo, branch) is not None:
            return handler._error(409, f"Reference refs/heads/{branch} already exists")
        start = payload.get("startingPoint") or head(repo, "main")
        _git(repo, "update-ref", f"refs/heads/{branch}", start)
        handler._reply(200, {})

    def _commit(self, handler: _Handler, repo_id: str, repo: Path, branch: str, body: bytes) -> None:
        summary, files = "", {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"] + "\n\n" + item["value"].get("description", "")
            elif item["key"] == "file" and item["value"]["encoding"] == "base64":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                return handler._error(400, f"the stand-in does not implement commit operation {item['key']!r}")
        sha = commit_files(repo, files, summary.strip(), branch)
        handler._reply(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}"})


class HostileListing(_Server):
    """Answers ``GET /api/models/<repo>/revision/<rev>`` (model_info) with the given file names, as a
    malicious or broken server might."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names

    def route(self, handler: _Handler, method: str, path: str, body: bytes) -> None:
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if method != "GET" or match is None:
            return handler._error(404, f"no route {method} {path}")
        handler._reply(
            200,
            {
                "id": match.group(1),
                "sha": "0" * 40,
                "private": False,
                "siblings": [{"rfilename": name} for name in self.names],
            },
        )


# ------------------------------------------------------------------------------- test experts


def write_expert(path: Path, *, skill: str, seed: int, rank: int = 4, metadata: dict[str, str] | None = None) -> Path:
    """A small random LoRA written by the toolkit's own ``save_lora`` (kohya layout, selma metadata)."""
    import torch

    from selma_toolkit.lora import LoraModule, LoraWeights, lora_metadata, save_lora

    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for block in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0"):
        for proj in ("to_q", "to_k"):
            modules[f"unet.{block}.transformer_blocks.0.attn1.{proj}"] = LoraModule(
                down=torch.randn(rank, 32, generator=generator),
                up=torch.randn(32, rank, generator=generator),
                alpha=float(rank),
            )
    meta = {
        **lora_metadata(base_model="stabilityai/stable-diffusion-2-1-base", architecture="sd2", skill=skill or None),
        **(metadata or {}),
    }
    return save_lora(LoraWeights(modules=modules), path, metadata=meta)
