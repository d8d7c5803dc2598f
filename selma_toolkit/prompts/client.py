"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama, ...) through the
``openai`` SDK, with an on-disk answer cache.

Retries are the SDK's own: exponential backoff with jitter on connection errors, timeouts, 408,
409, 429 and 5xx, honouring ``Retry-After``; ``llm.max_retries`` and ``llm.timeout`` configure it
and nothing here retries again on top. The API key is read from the environment variable the
recipe names and goes only to the SDK: it is never logged, cached, written or put in a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from selma_toolkit.config.prompts import LLMSettings
from selma_toolkit.errors import EndpointError
from selma_toolkit.io import atomic_write_text

log = logging.getLogger(__name__)

# The SDK refuses to start without a key; a local server that checks none accepts any string.
PLACEHOLDER_KEY = "no-key-needed"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def default_cache_dir() -> Path:
    """Where answers are cached: ``$SELMA_CACHE/llm`` (default ``~/.cache/selma/llm``)."""
    return Path(os.environ.get("SELMA_CACHE", Path.home() / ".cache" / "selma")) / "llm"


def is_local_endpoint(base_url: str) -> bool:
    """True for a server on this machine (which usually needs no key)."""
    host = (urlsplit(base_url).hostname or "").lower()
    return host in _LOCAL_HOSTS or host.endswith(".localhost") or host.startswith("127.")


def resolve_api_key(settings: LLMSettings) -> str:
    """The key from ``$<llm.api_key_env>``, the placeholder for a keyless local endpoint, or an
    EndpointError before any request when the endpoint needs a key and none is set."""
    key = os.environ.get(settings.api_key_env, "").strip()
    if key:
        return key
    required = settings.api_key_required
    if required is None:
        required = not is_local_endpoint(settings.base_url)
    if required:
        raise EndpointError(
            f"llm.api_key_env: the environment variable {settings.api_key_env} is not set, and the endpoint "
            f"{settings.base_url} needs an API key. Set it (export {settings.api_key_env}=...) and rerun; "
            "for a server that takes no key, set llm.api_key_required = false"
        )
    return PLACEHOLDER_KEY


@dataclass(frozen=True)
class LLMAnswer:
    """What one request returned (and what the cache keeps: never the key)."""

    text: str
    finish_reason: str | None
    request_id: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    from_cache: bool = False


class LLMClient:
    """One endpoint from the recipe's ``[llm]`` table; ``complete(prompt)`` returns the answer."""

    def __init__(self, settings: LLMSettings, cache_dir: Path | None = None):
        from openai import OpenAI  # imported here: only the prompt stage needs it

        self.settings = settings
        self._key = resolve_api_key(settings)
        self._cache_dir = (cache_dir or default_cache_dir()) if settings.cache else None
        self._client = OpenAI(
            api_key=self._key, base_url=settings.base_url, max_retries=settings.max_retries, timeout=settings.timeout
        )

    def _body(self, prompt: str) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if s.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def _cache_path(self, prompt: str, sample: str) -> Path | None:
        if self._cache_dir is None:
            return None
        # ``sample`` tells apart requests with the same text (early on, the pool is only the seeds):
        # each is its own draw at temperature > 0, and a rerun asks for the same draws again.
        identity = {
            "base_url": self.settings.base_url.rstrip("/"),
            "api": self.settings.api,
            "body": self._body(prompt),
            "sample": sample,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
        return self._cache_dir / digest[:2] / f"{digest}.json"

    def cached(self, prompt: str, sample: str) -> LLMAnswer | None:
        """The cached answer to exactly this request and sample, or None."""
        path = self._cache_path(prompt, sample)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return LLMAnswer(**{**data, "from_cache": True})
        except (ValueError, TypeError):
            log.warning("ignoring an unreadable cache entry %s", path)
            return None

    def complete(self, prompt: str, sample: str) -> LLMAnswer:
        """Send one request (the SDK retries as configured) and cache the answer under (prompt, sample)."""
        answer = self._request(prompt)
        path = self._cache_path(prompt, sample)
        if path is not None:
            atomic_write_text(path, json.dumps({k: v for k, v in asdict(answer).items() if k != "from_cache"}))
        return answer

    def _request(self, prompt: str) -> LLMAnswer:
        import openai

        body = self._body(prompt)
        try:
            if self.settings.api == "chat":
                response = self._client.chat.completions.create(**body)
                choice = response.choices[0] if response.choices else None
                text = choice.message.content if choice is not None and choice.message is not None else None
            else:
                response = self._client.completions.create(**body)
                choice = response.choices[0] if response.choices else None
                text = choice.text if choice is not None else None
        except openai.APIError as exc:
            raise EndpointError(self._describe(exc)) from None
        usage = response.usage
        return LLMAnswer(
            text=text or "",
            finish_reason=choice.finish_reason if choice is not None else None,
            request_id=response._request_id or response.id,
            prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
            completion_tokens=(usage.completion_tokens or 0) if usage else 0,
        )

    def _describe(self, exc: Exception) -> str:
        """A message for a failed request that says what to do; the key is masked if a server
        echoed it back."""
        import openai

        s = self.settings
        where = f"{s.base_url} (llm.base_url, model {s.model!r}, api {s.api!r})"
        tries = f"after {s.max_retries} retries (llm.max_retries)"
        if isinstance(exc, openai.APITimeoutError):
            message = f"no answer from {where} within {s.timeout:g} s {tries}; raise llm.timeout or check the server"
        elif isinstance(exc, openai.APIConnectionError):
            message = f"cannot reach {where} {tries}; check that the server runs and the URL (usually ending in /v1)"
        elif isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            message = (
                f"{where} refused the API key from ${s.api_key_env} ({exc.status_code}); "
                f"set a valid key in {s.api_key_env}"
            )
        elif isinstance(exc, openai.NotFoundError):
            message = f"{where} answered 404: check llm.model and llm.base_url (and llm.api: chat or completions)"
        elif isinstance(exc, openai.RateLimitError):
            message = f"{where} is still rate-limiting (429) {tries}; lower llm.concurrency or wait"
        elif isinstance(exc, openai.APIStatusError):
            retried = exc.status_code in (408, 409) or exc.status_code >= 500
            message = f"{where} answered HTTP {exc.status_code}{' ' + tries if retried else ''}: {exc.message}"
        else:
            message = f"{where} gave an unusable answer: {exc}"
        if self._key != PLACEHOLDER_KEY:
            message = message.replace(self._key, "***")
        return message

    def close(self) -> None:
        self._client.close()
