"""Talking to the Hub: huggingface_hub and network failures turned into one HubError each,
naming what was asked and the next step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from selma_toolkit.errors import HubError, Remedy
from selma_toolkit.hub.names import LOGIN_HINT


@contextlib.contextmanager
def hub_errors(what: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network failures into one HubError naming ``what`` and the next step
    (and, when the server cannot be reached, the endpoint: ``endpoint``, else HF_ENDPOINT's)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise HubError(f"{what}: the repo is gated; accept its terms on the Hub, then {LOGIN_HINT}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: repository not found (or private: {LOGIN_HINT})") from None
    except RevisionNotFoundError:
        raise HubError(
            what="revision not found", where=what, remedies=[Remedy.check("revision", "branch, tag or commit")]
        ) from None
    except RemoteEntryNotFoundError:
        raise HubError(f"{what}: the file is not in the repo at this revision") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if isinstance(exc.__cause__, _transport_errors()):  # online, but the server did not answer
            raise _unreachable(
                what, endpoint, exc.__cause__, " (the file is not in the local Hugging Face cache either)"
            ) from None
        raise HubError(
            f"{what}: not in the local Hugging Face cache and the Hub cannot be reached (offline mode: "
            "HF_HUB_OFFLINE=1, or no network); pull it once while online"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        said = f" ({exc.server_message[:200]})" if getattr(exc, "server_message", None) else ""
        hint = f"; {LOGIN_HINT}" if status in (401, 403) else ""
        raise HubError(f"{what}: the Hub answered HTTP {status}{said}{hint}") from None
    except _transport_errors() as exc:
        raise _unreachable(what, endpoint, exc) from None


def _unreachable(what: str, endpoint: str | None, exc: BaseException, note: str = "") -> HubError:
    from huggingface_hub import constants

    where = endpoint or constants.ENDPOINT
    return HubError(
        what=f"cannot reach the Hub at {where} ({type(exc).__name__}: {exc}){note}",
        where=what,
        remedies=[Remedy.do("check the network"), Remedy.check("endpoint", "Hub endpoint")],
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of the HTTP library huggingface_hub uses (requests in older releases, httpx
    or httpx2 in newer ones); it lets them through unwrapped."""
    import importlib

    errors: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)
