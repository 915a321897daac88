"""What the operator of a proxy bounds: candidates, tokens, body size, requests in flight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """Server-side defaults and limits of :func:`~fusion_graph.serve.create_app`; requests
    beyond them are refused with an OpenAI-style error, never silently clipped."""

    max_n: int = 16
    """Most candidates one request may ask for (400 above it)."""
    default_n: int = 4
    """Candidates when a request's ``fusion_graph`` object gives no ``n``."""
    default_strategy: Literal["fusion", "best_of_n"] = "fusion"
    """The strategy of a ``fusion_graph`` object that names none on a plain model name."""
    max_tokens: int = 2048
    """Most ``max_tokens`` (or ``max_completion_tokens``) a request may ask for, per call
    (400 above it)."""
    max_body_bytes: int = 1_000_000
    """Largest request body, in bytes (413 above it)."""
    max_in_flight: int = 64
    """Requests served at once; more wait in the queue."""
    max_queue: int = 64
    """Requests waiting for a turn; one more is answered 429 with ``Retry-After``."""
    retry_after_s: int = 1
    """The ``Retry-After`` of a 429, in seconds."""
    min_candidates: int = 1
    """The quorum: fewer successful candidates than this is a 502 with every cause."""

    def __post_init__(self) -> None:
        for name in ("max_n", "default_n", "max_tokens", "max_body_bytes", "max_in_flight"):
            if getattr(self, name) < 1:
                msg = f"ServeLimits.{name} must be at least 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.max_queue < 0 or self.retry_after_s < 0:
            msg = "ServeLimits.max_queue and retry_after_s must be at least 0"
            raise ValueError(msg)
        if not 1 <= self.default_n <= self.max_n:
            msg = f"ServeLimits.default_n ({self.default_n}) must be in 1..max_n ({self.max_n})"
            raise ValueError(msg)
        if not 1 <= self.min_candidates <= self.max_n:
            msg = f"ServeLimits.min_candidates must be in 1..max_n, got {self.min_candidates}"
            raise ValueError(msg)
