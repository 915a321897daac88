"""Which strategy a request asks for: the model-name grammar and the ``fusion_graph``
request field.

The ``model`` of a request names the strategy and the upstream model::

    MODEL     := [STRATEGY "/"] UPSTREAM
    STRATEGY  := "fusion-" N ["-critic"]                Fusion-of-N; the upstream model fuses
               | "bon-" N ["-" SELECTOR] ["-critic"]    Best-of-N; SELECTOR is judge (the
                                                        default), pairwise or vote
               | "vote-" N ["-critic"]                  the same as bon-N-vote

``fusion-4/smollm2``, ``bon-8-judge/smollm2``, ``bon-4-vote/smollm2``, ``vote-5/smollm2``.
A name without a strategy prefix (``smollm2``, ``Qwen/Qwen2.5-7B-Instruct``) passes straight
through to the upstream: one upstream call. A first segment that starts like a strategy
(``fusion-``, ``bon-``, ``vote-``) but does not parse is an error, never a model name.

The request's ``fusion_graph`` object (what the ``openai`` client sends as
``extra_body={"fusion_graph": {...}}``) sets or overrides the same choices: ``strategy``
(``"fusion"``, ``"best_of_n"`` or ``"none"``), ``n``, ``selector``, ``critic``. With only
``n`` (or ``selector``, ``critic``) on a plain model name, the server's default strategy
is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fusion_graph.nodes.judges import SELECTOR_NAMES

StrategyKind = Literal["pass_through", "fusion", "best_of_n"]
"""What the proxy does with a request.

* ``"pass_through"``: one upstream call, the request as it came.
* ``"fusion"``: N candidates, then the upstream model fuses them (FusioN).
* ``"best_of_n"``: N candidates, then a selector picks one (BoN).
"""

SelectorName = Literal["judge", "pairwise", "vote"]

_PREFIXES = ("fusion-", "bon-", "vote-")
_STRATEGY = re.compile(
    r"^(?:fusion-(?P<fusion_n>\d+)"
    r"|bon-(?P<bon_n>\d+)(?:-(?P<selector>(?!critic$)[a-z]+))?"
    r"|vote-(?P<vote_n>\d+))"
    r"(?P<critic>-critic)?$"
)
_REQUEST_STRATEGIES = {"fusion": "fusion", "best_of_n": "best_of_n", "none": "pass_through"}


class StrategyError(ValueError):
    """A request names a strategy that does not exist or is out of the server's limits."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param
        """The request field at fault (``"model"``, ``"fusion_graph.n"``, ...)."""


@dataclass(frozen=True, kw_only=True)
class StrategyChoice:
    """What one request asked for, validated against the server's limits."""

    kind: StrategyKind
    """Pass through, fuse or select."""
    upstream_model: str
    """The upstream model's name, as the request gave it."""
    n: int = 1
    """Candidates (1 for a pass-through)."""
    selector: SelectorName | None = None
    """How Best-of-N picks (``None`` otherwise)."""
    critic: bool = False
    """Whether each candidate is critiqued (by the upstream model) before the decision."""

    @property
    def strategy_key(self) -> tuple[StrategyKind, int, SelectorName | None, bool]:
        """What decides which runnable serves the request (the upstream model aside)."""
        return (self.kind, self.n, self.selector, self.critic)

    @property
    def model_name(self) -> str:
        """The canonical model name of what runs, e.g. ``bon-4-vote/smollm2``: the
        response's ``model``."""
        critic = "-critic" if self.critic else ""
        if self.kind == "fusion":
            return f"fusion-{self.n}{critic}/{self.upstream_model}"
        if self.kind == "best_of_n":
            return f"bon-{self.n}-{self.selector}{critic}/{self.upstream_model}"
        return self.upstream_model


@dataclass(frozen=True, kw_only=True)
class StrategyOverrides:
    """The request's ``fusion_graph`` object, each field ``None`` when not given."""

    strategy: str | None = None
    n: int | None = None
    selector: str | None = None
    critic: bool | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.strategy, self.n, self.selector, self.critic))


def parse_model_name(model: str) -> StrategyChoice:
    """The strategy a model name asks for (limits unchecked: see :func:`choose_strategy`).

    Example:
        >>> parse_model_name("bon-8/smollm2").selector
        'judge'
        >>> parse_model_name("Qwen/Qwen2.5-7B-Instruct").kind
        'pass_through'
    """
    head, sep, rest = model.partition("/")
    if not sep or not head.startswith(_PREFIXES):
        if not model.strip():
            msg = "the model name is empty"
            raise StrategyError(msg, param="model")
        return StrategyChoice(kind="pass_through", upstream_model=model)
    found = _STRATEGY.match(head)
    if found is None:
        msg = (
            f"unknown strategy {head!r} in model {model!r}: use fusion-N, bon-N[-SELECTOR], "
            f"vote-N (each optionally ending in -critic) before '/'; selectors are "
            f"{', '.join(SELECTOR_NAMES)}"
        )
        raise StrategyError(msg, param="model")
    if not rest.strip():
        msg = f"model {model!r} names a strategy but no upstream model after '/'"
        raise StrategyError(msg, param="model")
    critic = found["critic"] is not None
    if found["fusion_n"] is not None:
        return StrategyChoice(
            kind="fusion", upstream_model=rest, n=int(found["fusion_n"]), critic=critic
        )
    if found["vote_n"] is not None:
        return StrategyChoice(
            kind="best_of_n",
            upstream_model=rest,
            n=int(found["vote_n"]),
            selector="vote",
            critic=critic,
        )
    return StrategyChoice(
        kind="best_of_n",
        upstream_model=rest,
        n=int(found["bon_n"]),
        selector=_selector(found["selector"] or "judge", param="model"),
        critic=critic,
    )


def choose_strategy(
    model: str,
    overrides: StrategyOverrides | None = None,
    *,
    max_n: int,
    default_strategy: Literal["fusion", "best_of_n"] = "fusion",
    default_n: int = 4,
) -> StrategyChoice:
    """The strategy of a request: its model name, then its ``fusion_graph`` object, checked
    against ``max_n``.

    Raises:
        StrategyError: an unknown strategy or selector, or ``n`` outside ``1..max_n``.
    """
    choice = parse_model_name(model)
    extra = overrides or StrategyOverrides()
    if extra.given:
        kind = choice.kind
        if extra.strategy is not None:
            if extra.strategy not in _REQUEST_STRATEGIES:
                msg = (
                    f"unknown fusion_graph.strategy {extra.strategy!r}: choose from "
                    f"{', '.join(_REQUEST_STRATEGIES)}"
                )
                raise StrategyError(msg, param="fusion_graph.strategy")
            kind = _REQUEST_STRATEGIES[extra.strategy]  # type: ignore[assignment]
        elif kind == "pass_through":
            kind = default_strategy
        if kind == "pass_through":
            return StrategyChoice(kind="pass_through", upstream_model=choice.upstream_model)
        n = choice.n if choice.kind != "pass_through" else default_n
        if extra.n is not None:
            n = extra.n
        selector = choice.selector
        if extra.selector is not None:
            selector = _selector(extra.selector, param="fusion_graph.selector")
        choice = StrategyChoice(
            kind=kind,
            upstream_model=choice.upstream_model,
            n=n,
            selector=(selector or "judge") if kind == "best_of_n" else None,
            critic=extra.critic if extra.critic is not None else choice.critic,
        )
    if choice.kind != "pass_through" and not 1 <= choice.n <= max_n:
        param = "fusion_graph.n" if extra.n is not None else "model"
        msg = f"n must be between 1 and {max_n} on this server, got {choice.n}"
        raise StrategyError(msg, param=param)
    return choice


def _selector(name: str, *, param: str) -> SelectorName:
    if name not in SELECTOR_NAMES:
        msg = f"unknown selector {name!r}: choose from {', '.join(SELECTOR_NAMES)}"
        raise StrategyError(msg, param=param)
    return name  # type: ignore[return-value]
