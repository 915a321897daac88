"""The few exceptions users catch, in one hierarchy under :class:`FusionGraphError`.

Misuse (bad options) raises ``ValueError`` / ``TypeError`` when the wrapper or graph is
built. A single failed candidate is never raised: it is data on that candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from fusion_graph.types import Candidate


class FusionGraphError(Exception):
    """Base class of fusion-graph's runtime errors."""


class NotEnoughCandidatesError(ExceptionGroup[Exception], FusionGraphError):
    """Fewer than ``min_candidates`` candidates succeeded.

    An ``ExceptionGroup`` whose ``exceptions`` are every failed candidate's error (in index
    order), so ``except*`` works; ``candidates`` holds every candidate, failures included.
    It is also a :class:`FusionGraphError`, so ``except FusionGraphError`` catches it.
    """

    candidates: tuple[Candidate, ...]
    required: int

    def __new__(
        cls,
        message: str,
        exceptions: Sequence[Exception],
        *,
        candidates: Sequence[Candidate] = (),
        required: int = 1,
    ) -> Self:
        self = super().__new__(cls, message, exceptions)
        self.candidates = tuple(candidates)
        self.required = required
        return self

    def __init__(
        self,
        message: str,
        exceptions: Sequence[Exception],
        *,
        candidates: Sequence[Candidate] = (),
        required: int = 1,
    ) -> None:
        super().__init__(message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> NotEnoughCandidatesError:  # type: ignore[override]
        return NotEnoughCandidatesError(
            self.message, excs, candidates=self.candidates, required=self.required
        )


class DecisionError(FusionGraphError):
    """The fusor or selector failed after its retries and no fallback was configured.

    The underlying error is the ``__cause__``.
    """


class SelectorOutputError(FusionGraphError):
    """A judge's output could not be turned into a valid verdict for any candidate."""
