"""The data that a Best-of-N / Fusion-of-N run produces and keeps.

Everything generated stays here: successful and failed candidates, their critiques,
token usage and timings, and the decision. These models live in graph state (and so in a
checkpointer). Checkpoints hold them as plain data (:meth:`Candidate.to_plain`): built-in
types and LangChain messages, which LangGraph's serializer restores without warnings, also
with ``LANGGRAPH_STRICT_MSGPACK=true``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import AIMessage
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, computed_field

Strategy = Literal["fusion", "best_of_n"]
"""How the N candidates become one answer.

* ``"fusion"``: a fusor model reads every candidate and writes one answer (FusioN).
* ``"best_of_n"``: a selector picks one candidate unchanged (BoN).
"""


StopCause = Literal["grace", "early_stop", "budget"]
"""What ended part of a run's work before it was done.

* ``"grace"``: enough candidates had succeeded and the grace window for the rest ran out
  (``min_candidates`` plus ``grace``).
* ``"early_stop"``: the vote was already settled (``MajorityVote(early_stop=...)``).
* ``"budget"``: the run's token budget was spent (``max_total_tokens``).
"""

Stage = Literal["candidates", "critiques", "decision"]
"""The stages of a run whose token usage is counted apart."""


CandidateStatus = Literal["ok", "failed", "cancelled"]
"""``"ok"``: it has a reply; ``"failed"``: its calls failed; ``"cancelled"``: the run stopped
it (or never started it) on purpose, see :data:`StopCause`."""


class Plain(dict[str, Any]):
    """A model as plain data (what a checkpoint stores: serialised as a plain ``dict``) that,
    in the process that made it, still knows the object it came from (``source``), so
    in-memory state keeps the very same object, and with it what is not serialised."""

    __slots__ = ("source",)

    source: object


class TokenUsage(BaseModel):
    """Token counts as reported by the model (zero when the model reports none)."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    """Prompt tokens."""
    output_tokens: int = 0
    """Generated tokens."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )

    @classmethod
    def sum(cls, usages: Iterable[TokenUsage | None]) -> TokenUsage | None:
        """The sum of the usages given, ``None`` entries skipped; ``None`` if none is left."""
        present = [u for u in usages if u is not None]
        if not present:
            return None
        total = present[0]
        for usage in present[1:]:
            total = total + usage
        return total

    @classmethod
    def of(cls, message: object) -> TokenUsage | None:
        """The usage a message reports, or ``None`` when it is not an ``AIMessage`` or
        reports none."""
        meta = message.usage_metadata if isinstance(message, AIMessage) else None
        if not meta:
            return None
        return cls(
            input_tokens=meta.get("input_tokens", 0), output_tokens=meta.get("output_tokens", 0)
        )


class ErrorInfo(BaseModel):
    """Why a call failed, kept as data (the exception itself is not serialisable)."""

    model_config = ConfigDict(frozen=True)

    type: str
    """The exception's class name, e.g. ``"TimeoutError"``."""
    message: str
    """The exception's message."""

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        return cls(type=type(exc).__name__, message=str(exc) or repr(exc))

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


class Critique(BaseModel):
    """One critic's notes on one candidate."""

    model: str
    """The critic model that wrote it."""
    text: str = ""
    """The critique itself (empty if the critic failed)."""
    score: float | None = None
    """A 1-10 score if the critic gave one it could be parsed from."""
    error: ErrorInfo | None = None
    """Set when the critic call failed; the candidate itself stays usable."""
    usage: TokenUsage | None = None
    """Tokens the critic call used."""
    latency_s: float = 0.0
    """Wall time of the critic call, in seconds."""


class Candidate(BaseModel):
    """One of the N answers, successful or not."""

    index: int
    """Position in the fan-out, 0-based. Candidates are always kept in index order."""
    model: str
    """Name of the model (or node) that made it."""
    message: AIMessage | None = None
    """The model's reply (text and/or tool calls); ``None`` if the call failed."""
    text: str = ""
    """The reply's text content."""
    error: ErrorInfo | None = None
    """Set when the candidate failed (after its retries)."""
    critiques: list[Critique] = Field(default_factory=list)
    """Critiques of this candidate, if a critic was configured."""
    usage: TokenUsage | None = None
    """Tokens the generation used, when the model reports them."""
    latency_s: float = 0.0
    """Wall time from the first attempt's start to the last attempt's end, in seconds."""
    attempts: int = 1
    """How many attempts were made (more than one when retries kicked in)."""
    seed: int | None = None
    """The sampling seed this candidate was given, where the model takes one."""
    multi_sample_error: ErrorInfo | None = None
    """Set when this candidate was to come from one multi-sample call (``n=N``) that
    failed: it was then made by a call of its own (``attempts`` and ``latency_s`` count
    both)."""
    stopped: StopCause | None = None
    """Set when the run cancelled this candidate, or never started it (``attempts == 0``):
    ``error`` then says why. ``None`` for a candidate that ran to its end."""

    _exception: Exception | None = PrivateAttr(default=None)

    @property
    def exception(self) -> Exception | None:
        """The original exception of a failed candidate, in the process that made it
        (``None`` once the candidate comes back from a checkpoint: ``error`` keeps its type
        name and message)."""
        return self._exception

    def with_exception(self, exc: Exception | None) -> Candidate:
        """This candidate, remembering ``exc`` as its :attr:`exception` (not serialised)."""
        self._exception = exc
        return self

    def __eq__(self, other: object) -> bool:
        # The exception object is not part of a candidate's value (it does not survive a
        # checkpoint, and exceptions do not compare equal).
        if not isinstance(other, Candidate):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def to_plain(self) -> dict[str, Any]:
        """The candidate as checkpoint-safe data (:meth:`from_plain` reverses it)."""
        data = Plain(self.model_dump(exclude={"message"}))
        data["message"] = self.message  # LangGraph's serializer knows LangChain messages
        data.source = self
        return data

    @classmethod
    def from_plain(cls, data: Candidate | dict[str, Any]) -> Candidate:
        """A candidate from :meth:`to_plain`'s data (a candidate is returned as it is)."""
        if isinstance(data, Plain) and isinstance(data.source, Candidate):
            return data.source  # in the process that made it: the same object
        return data if isinstance(data, Candidate) else cls.model_validate(data)

    @property
    def ok(self) -> bool:
        """Whether the candidate produced a reply."""
        return self.error is None and self.message is not None

    @property
    def status(self) -> CandidateStatus:
        """``"ok"``, ``"failed"`` or ``"cancelled"`` (stopped by the run, see ``stopped``)."""
        if self.ok:
            return "ok"
        return "cancelled" if self.stopped is not None else "failed"

    @classmethod
    def cancelled(
        cls,
        *,
        index: int,
        model: str,
        seed: int | None,
        cause: StopCause,
        why: str,
        attempts: int = 1,
        latency_s: float = 0.0,
    ) -> Candidate:
        """A candidate the run stopped (``attempts=1``) or never started (``attempts=0``)."""
        return cls(
            index=index,
            model=model,
            seed=seed,
            attempts=attempts,
            latency_s=latency_s,
            stopped=cause,
            error=ErrorInfo(type="CandidateCancelled", message=why),
        )

    @classmethod
    def of(
        cls, answer: Candidate | AIMessage | str, *, index: int, model: str = "given"
    ) -> Candidate:
        """A candidate from an answer you already have (a string or an ``AIMessage``);
        a :class:`Candidate` is returned re-indexed."""
        if isinstance(answer, Candidate):
            return answer if answer.index == index else answer.model_copy(update={"index": index})
        message = AIMessage(content=answer) if isinstance(answer, str) else answer
        if not isinstance(message, AIMessage):
            kind = type(answer).__name__
            msg = f"a candidate must be a Candidate, an AIMessage or a str, got {kind}"
            raise TypeError(msg)
        return cls(
            index=index,
            model=model,
            message=message,
            text=str(message.text),
            usage=TokenUsage.of(message),
        )


class Decision(BaseModel):
    """How the candidates became the final answer."""

    strategy: Strategy
    """``"fusion"`` or ``"best_of_n"``."""
    fused: bool = False
    """True when a fusor wrote the final answer."""
    selected_index: int | None = None
    """The winning candidate's index when one was selected (BoN, or a fusion fallback)."""
    score: float | None = None
    """The winner's score under the selector that picked it."""
    scores: dict[int, float] = Field(default_factory=dict)
    """Every scored candidate's score, by index."""
    method: str
    """What decided: the fusor's model name, or the selector's name."""
    fallback: bool = False
    """True when the configured fusor or selector failed and the fallback selector decided."""
    fallback_reason: str | None = None
    """Why the fallback was used."""
    rationale: str | None = None
    """A short explanation, when the selector gives one."""
    usage: TokenUsage | None = None
    """Tokens used by the decision calls (fusor or judges)."""
    latency_s: float = 0.0
    """Wall time of the decision, in seconds."""
    stopped: StopCause | None = None
    """What cut the run's work short, if anything: candidates cancelled after the grace
    window, a vote settled early, or a spent token budget (then the calls it refused,
    candidates, critiques or judge calls, did not start)."""
    stop_reason: str | None = None
    """Why, in words (e.g. the early-stopping vote's confidence when it stopped)."""
    samples_used: int | None = None
    """How many candidates the run asked for (``attempts > 0``; set when ``stopped`` is)."""

    def to_plain(self) -> dict[str, Any]:
        """The decision as checkpoint-safe data (:meth:`from_plain` reverses it)."""
        data = Plain(self.model_dump())
        data.source = self
        return data

    @classmethod
    def from_plain(cls, data: Decision | dict[str, Any]) -> Decision:
        """A decision from :meth:`to_plain`'s data (a decision is returned as it is)."""
        if isinstance(data, Plain) and isinstance(data.source, Decision):
            return data.source
        return data if isinstance(data, Decision) else cls.model_validate(data)


@dataclass(frozen=True, kw_only=True)
class FusionResult:
    """Everything one run produced: what ``FusionRunnable.run`` returns."""

    message: AIMessage
    """The final answer."""
    candidates: list[Candidate]
    """Every candidate, index order, failures included."""
    decision: Decision
    """How the answer was reached."""
    update: dict[str, Any] | None = None
    """For a wrapped node: the update of the candidate the answer builds on."""

    @property
    def usage(self) -> TokenUsage | None:
        """Tokens of every call the run made: candidates, critiques and the decision."""
        return TokenUsage.sum(self.usage_by_stage().values())

    def usage_by_stage(self) -> dict[Stage, TokenUsage | None]:
        """Tokens per stage: ``candidates``, ``critiques`` and ``decision``."""
        return usage_by_stage(self.candidates, self.decision)


def usage_by_stage(
    candidates: Iterable[Candidate], decision: Decision | None
) -> dict[Stage, TokenUsage | None]:
    """Tokens per stage of a run (``None`` where nothing was reported)."""
    made = list(candidates)
    return {
        "candidates": TokenUsage.sum(c.usage for c in made),
        "critiques": TokenUsage.sum(k.usage for c in made for k in c.critiques),
        "decision": decision.usage if decision is not None else None,
    }
