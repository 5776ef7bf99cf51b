"""Errors as typed exceptions, each carrying the server's ``detail``."""

from __future__ import annotations

from typing import Any, Optional

import httpx


class SandboxdError(Exception):
    """A call sandboxd answered with an error (or could not be made)."""

    def __init__(self, status: int, detail: Any, response: Optional[httpx.Response] = None):
        self.status = status
        self.detail = detail
        self.response = response
        super().__init__(f"{status}: {detail}")


class BadRequest(SandboxdError):
    """400: e.g. a path that is a directory, or a terminal request that is not an upgrade."""


class Unauthorized(SandboxdError):
    """401: the token is missing or wrong."""


class Forbidden(SandboxdError):
    """403: a read-only mount, or a symlink that leads off the sandbox's mounts."""


class NotFound(SandboxdError):
    """404: no such sandbox, process, file, workspace or chat."""


class Conflict(SandboxdError):
    """409: the sandbox is not running (the detail names its phase), or a state conflict."""


class SandboxConflict(Conflict):
    """409 ``sandbox_conflict``: a live sandbox of the chat has another agent or volume."""


class PayloadTooLarge(SandboxdError):
    """413: over a size limit or a workspace's quota."""


class ValidationError(SandboxdError):
    """422: invalid input; ``errors`` lists every problem (``type``, ``loc``, ``msg``)."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.detail) if isinstance(self.detail, list) else []


class RateLimited(SandboxdError):
    """429: over a concurrency limit; ``retry_after`` seconds."""

    @property
    def retry_after(self) -> float:
        raw = self.response.headers.get("retry-after") if self.response is not None else None
        try:
            return float(raw) if raw is not None else 1.0
        except ValueError:
            return 1.0


class ServerError(SandboxdError):
    """5xx."""


class Unavailable(ServerError):
    """503: the engine does not answer, a start failed, or a resume could not be made."""


class Timeout(ServerError):
    """504: the outcome did not come within the server's wait."""


_BY_STATUS: dict[int, type[SandboxdError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
    504: Timeout,
}


def error_from(status: int, detail: Any, response: Optional[httpx.Response] = None) -> SandboxdError:
    """The typed exception for a status and the server's detail."""
    if status == 409 and detail == "sandbox_conflict":
        return SandboxConflict(status, detail, response)
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else SandboxdError)
    return cls(status, detail, response)


def error_for(response: httpx.Response) -> SandboxdError:
    """The typed exception for an error response."""
    try:
        detail: Any = response.json().get("detail", response.text)
    except Exception:  # not JSON: the text is the detail
        detail = response.text
    return error_from(response.status_code, detail, response)
