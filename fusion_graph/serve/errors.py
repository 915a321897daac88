"""Errors as OpenAI-style JSON: which status and body each failure of a request gets.

``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body, an unknown
strategy or ``n`` out of range, 401 for a missing or wrong API key, 413 for an oversized
body, 429 (with ``Retry-After``) when the server is at its limit, 502 when the upstream
failed (fewer successful candidates than the quorum: every cause listed). Messages name
what went wrong, never the request's content or a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusion_graph.errors import DecisionError, NotEnoughCandidatesError
from fusion_graph.serve.openai_format import error_body


class ServeError(Exception):
    """A request's failure as an HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        """Extra fields of the error object (e.g. ``causes`` of a 502)."""

    def body(self) -> dict[str, Any]:
        body = error_body(self.message, type=self.type, param=self.param, code=self.code)
        body["error"].update(self.details)
        return body


def bad_request(message: str, *, param: str | None = None) -> ServeError:
    return ServeError(400, message, type="invalid_request_error", param=param)


def _names(exc: BaseException) -> set[str]:
    return {k.__name__ for k in type(exc).__mro__}


def upstream_failure(exc: Exception) -> ServeError:
    """The error of a request whose upstream work failed.

    Fewer successful candidates than the quorum and a failed decision are 502s (the
    candidates' causes listed under ``causes``); an upstream HTTP or connection error of a
    pass-through is a 502 naming the upstream's status; a bad call option the model refused
    is a 400; anything else is a 500 without details.
    """
    if isinstance(exc, NotEnoughCandidatesError):
        causes = [
            {"index": c.index, "model": c.model, "type": c.error.type, "message": c.error.message}
            for c in exc.candidates
            if c.error is not None
        ]
        ok = sum(1 for c in exc.candidates if c.ok)
        listed = "; ".join(f"candidate {c['index']}: {c['type']}: {c['message']}" for c in causes)
        message = (
            f"{ok} of {len(exc.candidates)} candidates succeeded, {exc.required} needed: {listed}"
        )
        return ServeError(
            502,
            message,
            type="upstream_error",
            code="not_enough_candidates",
            details={"causes": causes},
        )
    if isinstance(exc, DecisionError):
        return ServeError(502, str(exc), type="upstream_error", code="decision_failed")
    names = _names(exc)
    if "APIStatusError" in names:
        status = getattr(exc, "status_code", None)
        message = f"the upstream answered {status}: {getattr(exc, 'message', exc)}"
        return ServeError(502, message, type="upstream_error", code="upstream_status")
    if names & {"APIConnectionError", "ConnectError", "ConnectionError", "TimeoutError"}:
        message = f"the upstream could not be reached: {type(exc).__name__}"
        return ServeError(502, message, type="upstream_error", code="upstream_unreachable")
    if isinstance(exc, ValueError | TypeError):
        return bad_request(f"the upstream model refused the request: {exc}")
    return ServeError(500, "internal error", type="server_error")
