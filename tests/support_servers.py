"""Pieces every local test server shares (tests/support_hub.py, support_llm.py, support_comfyui.py)."""

from __future__ import annotations

import json
import subprocess
from http.server import BaseHTTPRequestHandler
from typing import Any


def send_json(
    handler: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None
) -> None:
    """Answer a request with ``payload`` as JSON, a Content-Length and any extra ``headers``."""
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """Terminate a server process if it still runs; kill it if it ignores that for ``timeout`` s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
