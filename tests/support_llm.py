"""A scripted LLM for tests: a real HTTP server on 127.0.0.1 that speaks the OpenAI
``/v1/completions`` and ``/v1/chat/completions`` APIs and answers from a script. It is not a
model: by default it answers every request with fresh numbered prompts made from word lists, as a
deterministic function of the request (so the same request always gets the same answer); tests
queue scripted actions first: a given answer, an HTTP error (429 with Retry-After, 500, 401, ...),
a hang past the client timeout, or closing the listener (an endpoint that went away).

The real ``openai`` SDK talks to it; nothing leaves 127.0.0.1. The ``scripted_llm`` fixture
(conftest.py) starts one per test.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support_servers import send_json

_ADJECTIVES = (
    "red",
    "tiny",
    "wooden",
    "striped",
    "sleepy",
    "golden",
    "rusty",
    "fluffy",
    "glass",
    "ancient",
    "purple",
    "shiny",
    "muddy",
    "paper",
    "frozen",
    "velvet",
    "neon",
    "marble",
    "dusty",
    "silver",
)
_NOUNS = (
    "fox",
    "teapot",
    "bicycle",
    "lantern",
    "violin",
    "cactus",
    "penguin",
    "umbrella",
    "robot",
    "kettle",
    "giraffe",
    "sailboat",
    "pumpkin",
    "owl",
    "typewriter",
    "canoe",
    "hedgehog",
    "telescope",
    "accordion",
    "yak",
)
_PLACES = (
    "beach",
    "library",
    "rooftop",
    "forest",
    "market",
    "kitchen",
    "desert",
    "harbor",
    "attic",
    "stadium",
    "glacier",
    "bakery",
    "subway",
    "meadow",
    "castle",
    "garage",
    "greenhouse",
    "canyon",
    "ferry",
    "museum",
)
_PATTERNS = (
    "A {a} {n} beside a {a2} {n2} on a {p}.",
    "{c} {a} {n}s resting in the {p} at dawn",
    "Photo of one {n} chasing a {a} {n2} across the {p}",
    "The {a} {n} and the {a2} {n2} share a {p} bench",
    "Close-up: {a} {n}, {a2} {n2}, {p} light",
)


def fresh_prompts(seed_text: str, count: int) -> list[str]:
    """``count`` varied prompts, a pure function of ``seed_text``."""
    rng = random.Random(hashlib.sha256(seed_text.encode()).hexdigest())
    prompts = []
    for _ in range(count):
        a, a2 = rng.sample(_ADJECTIVES, 2)
        n, n2 = rng.sample(_NOUNS, 2)
        prompts.append(
            rng.choice(_PATTERNS).format(a=a, a2=a2, n=n, n2=n2, p=rng.choice(_PLACES), c=rng.choice(("Two", "Three")))
        )
    return prompts


def prompt_of(body: dict[str, Any]) -> str:
    """The text a request asked: ``prompt`` (completions) or the user message (chat)."""
    if "messages" in body:
        return "\n".join(str(m.get("content", "")) for m in body["messages"])
    return str(body.get("prompt", ""))


def examples_in(prompt: str) -> list[str]:
    """The numbered examples shown in a request."""
    return re.findall(r"^\d+\. (.*)$", prompt, flags=re.M)


def numbered_answer(body: dict[str, Any]) -> str:
    """The default answer: a numbered list continuing after the examples (with prose around it
    on the chat API, as chat models write)."""
    prompt = prompt_of(body)
    asked = re.search(r"(\d+) more", prompt)
    start = len(examples_in(prompt)) + 1
    items = fresh_prompts(prompt, int(asked.group(1)) if asked else 5)
    listing = "\n".join(f"{start + i}. {text}" for i, text in enumerate(items))
    if "messages" in body:
        return f"Sure! Here are {len(items)} more descriptions:\n\n{listing}\n\nLet me know if you want more."
    return listing


@dataclass
class Reply:
    """Answer with this text."""

    text: str
    finish_reason: str = "stop"


@dataclass
class Fail:
    """Answer with an HTTP error."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hang:
    """Send nothing for ``seconds`` (longer than the client's timeout), then drop the connection."""

    seconds: float


class Close:
    """Stop listening: this and every later request finds no server (an unreachable endpoint)."""


@dataclass
class SeenRequest:
    path: str
    body: dict[str, Any]
    authorization: str | None
    at: float


class ScriptedLLM:
    """The server. ``then(*actions)`` queues scripted actions; when the queue is empty, requests
    get ``answer(body)`` (default: ``numbered_answer``) after ``delay`` seconds."""

    def __init__(self, answer: Callable[[dict[str, Any]], str] = numbered_answer, delay: float = 0.0):
        self.answer = answer
        self.delay = delay
        self.script: deque[Any] = deque()
        self.requests: list[SeenRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def then(self, *actions: Any) -> ScriptedLLM:
        with self._lock:
            self.script.extend(actions)
        return self

    def start(self) -> ScriptedLLM:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()

    def _close_listener(self) -> None:
        threading.Thread(target=self.stop, daemon=True).start()

    def _next_action(self) -> Any:
        with self._lock:
            return self.script.popleft() if self.script else None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a closed listener is unreachable at once

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                send_json(self, status, payload, headers)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append(
                        SeenRequest(self.path, body, self.headers.get("Authorization"), time.monotonic())
                    )
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body: dict[str, Any]) -> None:
                chat = self.path.rstrip("/").endswith("/chat/completions")
                if not chat and not self.path.rstrip("/").endswith("/completions"):
                    self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                action = server._next_action()
                if isinstance(action, Close):
                    server._close_listener()
                    return
                if isinstance(action, Hang):
                    server._stopping.wait(action.seconds)
                    return
                if isinstance(action, Fail):
                    self._json(
                        action.status,
                        {"error": {"message": f"scripted {action.status}", "type": "scripted"}},
                        action.headers,
                    )
                    return
                if server.delay:
                    server._stopping.wait(server.delay)
                reply = action if isinstance(action, Reply) else Reply(server.answer(body))
                request_id = "req-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
                usage = {"prompt_tokens": len(prompt_of(body).split()), "completion_tokens": len(reply.text.split())}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                if chat:
                    choice = {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": reply.finish_reason,
                    }
                    kind = "chat.completion"
                else:
                    choice = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
                    kind = "text_completion"
                self._json(
                    200,
                    {
                        "id": request_id,
                        "object": kind,
                        "created": 0,
                        "model": body.get("model", "scripted"),
                        "choices": [choice],
                        "usage": usage,
                    },
                    {"x-request-id": request_id},
                )

        return Handler


def skill_data(url: str, **changes: Any) -> dict[str, Any]:
    """Raw skill-recipe data for an LLM skill that talks to ``url`` (small counts, fast retries)."""
    data: dict[str, Any] = {
        "name": "scripted",
        "source": "llm",
        "instruction": "Please create {n} more diverse image descriptions, each less than {max_words} words.\n"
        "Here are some image description examples:",
        "seeds": [
            "Dogs stick their heads out of car windows.",
            "A brown purse is sitting on a green bench.",
            "A group of motorcycle riders driving past buildings.",
        ],
        "num_prompts": 12,
        "prompts_per_request": 5,
        "llm": {
            "base_url": url,
            "model": "scripted-llm",
            "api": "completions",
            "concurrency": 2,
            "max_retries": 2,
            "timeout": 5.0,
            "api_key_env": "SELMA_TEST_LLM_KEY",
        },
    }
    for key, value in changes.items():
        if key == "llm":
            data["llm"] = {**data["llm"], **value}
        else:
            data[key] = value
    return data
