"""The upstream a proxy serves: its model names, one chat model per replica, the
Fusion-of-N / Best-of-N runnable of each strategy, built with the public API on first use
and cached (one object per distinct strategy), and, for an OpenAI-compatible server, the
:class:`~fusion_graph.serve.forward.Forwarder` of its raw pass-through."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable

from fusion_graph.models import ModelSpec, build_model
from fusion_graph.nodes.judges import make_selector
from fusion_graph.runtime import model_name
from fusion_graph.serve.forward import Forwarder
from fusion_graph.serve.strategy import StrategyChoice
from fusion_graph.wrap import FusionRunnable, best_of_n, fusion_of_n


class Upstream:
    """The model behind the proxy.

    Args:
        models: The upstream chat model, or its replicas (a pool: candidate ``i`` uses
            ``models[i % len]``; pass-through requests take turns). The first one fuses,
            judges and critiques.
        names: The model names requests may use for it (default: the model's own name).
        min_candidates: The quorum of every fan-out (capped at its ``n``).
        forwarder: Where a pass-through request's raw body goes (an OpenAI-compatible
            server); without one, pass-through requests go through the chat model.
    """

    def __init__(
        self,
        models: BaseChatModel | Sequence[BaseChatModel],
        *,
        names: Sequence[str] = (),
        min_candidates: int = 1,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.models: tuple[BaseChatModel, ...] = (
            (models,) if isinstance(models, BaseChatModel) else tuple(models)
        )
        if not self.models:
            msg = "an upstream needs at least one chat model"
            raise ValueError(msg)
        self.names: tuple[str, ...] = tuple(dict.fromkeys([*names, model_name(self.models[0])]))
        self.min_candidates = min_candidates
        self.forwarder = forwarder
        self._turns = itertools.cycle(self.models)
        self._runnables: dict[tuple[Any, ...], FusionRunnable] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(
        cls,
        spec: str | ModelSpec,
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        min_candidates: int = 1,
    ) -> Upstream:
        """The upstream a model spec names (``local``, ``openai:URL:MODEL``,
        ``vllm:URL:MODEL``; replicas joined with ``+``). Requests may call it by the spec's
        model name, its ``name=`` option, or ``local`` for the embedded model. An
        ``openai:`` / ``vllm:`` upstream forwards pass-through requests raw."""
        parsed = ModelSpec.parse(spec) if isinstance(spec, str) else spec
        urls: Sequence[str | None] = parsed.urls or (None,)
        models = []
        for url in urls:
            model = build_model(parsed, url=url, max_tokens=max_tokens, temperature=temperature)
            if "stream_usage" in type(model).model_fields:  # OpenAI-compatible: usage in streams
                model = model.model_copy(update={"stream_usage": True})
            models.append(model)
        names = [n for n in (parsed.options.get("name"), parsed.model) if n]
        if parsed.kind == "local":
            names.append("local")
        return cls(
            models,
            names=names,
            min_candidates=min_candidates,
            forwarder=Forwarder.from_spec(parsed),
        )

    @property
    def name(self) -> str:
        """The name the proxy lists the upstream under."""
        return self.names[0]

    def serves(self, model: str) -> bool:
        return model in self.names

    def next_model(self) -> BaseChatModel:
        """The replica for a pass-through request (they take turns)."""
        with self._lock:
            return next(self._turns)

    def runnable(self, choice: StrategyChoice) -> FusionRunnable:
        """The fusion or Best-of-N runnable of ``choice``'s strategy (cached)."""
        if choice.kind == "pass_through":
            msg = "a pass-through request has no fusion runnable: use next_model()"
            raise ValueError(msg)
        key = choice.strategy_key
        with self._lock:
            found = self._runnables.get(key)
            if found is None:
                found = self._runnables[key] = self._build(choice)
            return found

    def _build(self, choice: StrategyChoice) -> FusionRunnable:
        lead = self.models[0]
        step: Runnable[Any, Any] | list[Runnable[Any, Any]] = (
            list(self.models) if len(self.models) > 1 else lead
        )
        critic = lead if choice.critic else None
        quorum = min(self.min_candidates, choice.n)
        if choice.kind == "fusion":
            return fusion_of_n(step, n=choice.n, fusor=lead, critic=critic, min_candidates=quorum)
        selector = make_selector(choice.selector or "judge", lead)
        return best_of_n(step, n=choice.n, selector=selector, critic=critic, min_candidates=quorum)
