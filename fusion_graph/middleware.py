"""Best-of-N / Fusion-of-N for LangChain v1 agents: ``create_agent`` middleware.

``pip install 'fusion-graph[agents]'`` (``langchain>=1``), then::

    from langchain.agents import create_agent
    from fusion_graph.middleware import FusionMiddleware

    agent = create_agent(model, tools, middleware=[FusionMiddleware(n=4)])
    out = agent.invoke({"messages": [("user", "...")]})
    out["messages"][-1], out["fusion_candidates"], out["fusion_decision"]

Each model step of the agent becomes N candidate calls through the step's handler (so
the agent's own model, tools, system prompt, response format and inner middleware apply
to each), then one decision: :class:`FusionMiddleware` has a fusor (by default the
agent's model) write the answer through the same handler, so it is bound to the request's
tools and may call them; :class:`BestOfNMiddleware` returns the chosen candidate's
response untouched (its tool calls included). The agent runs the tools once, for the final
answer only: a candidate's tool calls are never executed.

* **Seeds and temperature**: candidate ``i`` is called with ``model_settings`` holding
  ``seed + i`` (and ``temperature`` if set) when the request's model has those fields.
* **Streaming**: candidate, critic and judge calls are tagged ``nostream``, so the agent's
  ``stream_mode="messages"`` shows only the final answer's tokens (the fusor's as they
  come; BoN's chosen answer as one message). Progress events arrive in ``custom`` mode.
* **State**: the last model step's candidates (``list[Candidate]``) and its
  :class:`~fusion_graph.Decision` are written to ``fusion_candidates`` and
  ``fusion_decision`` (the middleware's state schema), so ``invoke`` returns them and a
  checkpointer stores them. They are traced like every run (:mod:`fusion_graph.hooks`).
* **Composing with LangChain's middleware**: middleware listed *after* this one wraps each
  candidate call and the fusor call (e.g. ``ModelRetryMiddleware`` retries one candidate,
  ``ModelFallbackMiddleware`` swaps the model of one call); middleware listed *before* it
  wraps the whole step. ``ModelCallLimitMiddleware`` counts model *steps* (its
  ``after_model`` hook runs once per step), so a step of N candidates and a fusor counts
  as one call against its limits; ``SummarizationMiddleware`` runs before the step and
  every candidate sees the summarised conversation.
* **Control flow**: an ``interrupt()`` or ``ParentCommand`` raised inside a candidate call
  propagates (see :mod:`fusion_graph.node`); it is never a failed candidate.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NotRequired, Unpack, cast

from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import ensure_config, set_config_context
from langgraph.types import Command

from fusion_graph.nodes.decide import Selector
from fusion_graph.nodes.generator import Generator
from fusion_graph.nodes.select import RewardFn
from fusion_graph.options import FusionOptions
from fusion_graph.prompts import FUSION_PROMPT, PromptTemplate
from fusion_graph.runtime import INDEX_KEY, model_name, reraise_aborted, run_sync
from fusion_graph.state import CandidatesChannel, DecisionChannel
from fusion_graph.step import FusionStep
from fusion_graph.types import Candidate, Decision, FusionResult
from fusion_graph.wrap import StepOptions

try:
    from langchain.agents.middleware import (
        AgentMiddleware,
        AgentState,
        ExtendedModelResponse,
        ModelRequest,
        ModelResponse,
    )
    from langchain.agents.middleware.types import OmitFromInput
except ImportError as exc:  # pragma: no cover - depends on the extra
    msg = (
        "fusion_graph.middleware needs LangChain v1 agents: pip install 'fusion-graph[agents]' "
        "(langchain>=1)"
    )
    raise ImportError(msg) from exc

__all__ = ["BestOfNMiddleware", "FusionAgentState", "FusionMiddleware"]

CANDIDATES_KEY = "fusion_candidates"
"""State key of the last model step's candidates."""
DECISION_KEY = "fusion_decision"
"""State key of the last model step's decision."""

SyncHandler = Callable[[ModelRequest[Any]], ModelResponse[Any]]
AsyncHandler = Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]


class FusionAgentState(AgentState[Any]):
    """The agent state with the last model step's candidates and decision."""

    fusion_candidates: NotRequired[Annotated[list[Candidate], CandidatesChannel, OmitFromInput]]
    fusion_decision: NotRequired[Annotated[Decision, DecisionChannel, OmitFromInput]]


def _response(result: Any) -> ModelResponse[Any]:
    if isinstance(result, AIMessage):
        return ModelResponse(result=[result])
    if isinstance(result, ExtendedModelResponse):
        return result.model_response
    if isinstance(result, ModelResponse):
        return result
    msg = f"the model handler returned {type(result).__name__}, expected a ModelResponse"
    raise TypeError(msg)


def _ai(response: ModelResponse[Any]) -> AIMessage:
    for message in reversed(response.result):
        if isinstance(message, AIMessage):
            return message
    msg = "the model response holds no AIMessage"
    raise ValueError(msg)


class _HandlerCall(Runnable[Any, AIMessage]):
    """One model call through the agent's handler, as a Runnable the fan-out and the fusor
    can call: ``invoke(request, config, **model_settings)`` (candidates) or
    ``invoke(messages, config)`` (the fusor, on the request with its messages). Each call
    runs with its own config in the context (role, index, ``nostream``), which the model
    call inside the handler picks up. Keeps every response, by candidate index."""

    def __init__(
        self,
        request: ModelRequest[Any],
        sync: SyncHandler | None,
        async_: AsyncHandler | None,
        *,
        model: Any = None,
    ) -> None:
        self.request = request
        self.sync_handler = sync
        self.async_handler = async_
        self.model = model
        """The fusor: calls replace the request's model and messages."""
        self.responses: dict[int | None, ModelResponse[Any]] = {}

    def _request(self, input: Any, settings: dict[str, Any]) -> ModelRequest[Any]:
        if self.model is None:
            request: ModelRequest[Any] = input
            if settings:
                request = request.override(model_settings={**request.model_settings, **settings})
            return request
        messages: list[BaseMessage] = list(input)
        system = messages[0] if messages and isinstance(messages[0], SystemMessage) else None
        rest = messages[1:] if system is not None else messages
        return self.request.override(
            model=self.model, system_message=system, messages=cast("Any", rest)
        )

    def _kept(self, result: Any, config: RunnableConfig) -> AIMessage:
        response = _response(result)
        self.responses[config.get("metadata", {}).get(INDEX_KEY)] = response
        return _ai(response)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        if self.sync_handler is None:
            msg = "this agent runs async: call it with ainvoke/astream"
            raise RuntimeError(msg)
        config = ensure_config(config)
        request = self._request(input, kwargs)
        handler = self.sync_handler
        with set_config_context(config) as ctx:
            return self._kept(ctx.run(handler, request), config)

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        if self.async_handler is None:
            return await asyncio.to_thread(self.invoke, input, config, **kwargs)
        config = ensure_config(config)
        request = self._request(input, kwargs)
        with set_config_context(config) as ctx:
            work = cast("Any", self.async_handler(request))
            task: asyncio.Task[Any] = asyncio.create_task(work, context=ctx)
            return self._kept(await task, config)


class _FanOutMiddleware(AgentMiddleware[FusionAgentState, Any, Any]):
    """The shell shared by both middlewares: one :class:`FusionStep` per model call, whose
    generator is the handler."""

    state_schema = FusionAgentState

    def __init__(self, options: FusionOptions, *, fusor_is_model: bool = False) -> None:
        super().__init__()
        self.options = options
        self.fusor_is_model = fusor_is_model

    def _step(
        self, request: ModelRequest[Any], sync: SyncHandler | None, async_: AsyncHandler | None
    ) -> tuple[FusionStep, _HandlerCall, _HandlerCall | None]:
        calls = _HandlerCall(request, sync, async_)
        fields = Generator.of(request.model)
        generator = Generator(
            target=calls,
            name=model_name(request.model),
            is_node=False,
            takes_seed=fields.takes_seed,
            takes_temperature=fields.takes_temperature,
        )
        options = self.options
        fusor: _HandlerCall | None = None
        if options.strategy == "fusion":
            model = request.model if self.fusor_is_model else options.fusor
            fusor = _HandlerCall(request, sync, async_, model=model)
            fusor.name = model_name(model)
            options = dataclasses.replace(options, fusor=fusor)
        step = FusionStep(options, options.fan_out((generator,)), options.decider())
        return step, calls, fusor

    def _answer(
        self, result: FusionResult, calls: _HandlerCall, fusor: _HandlerCall | None
    ) -> ExtendedModelResponse[Any]:
        decision = result.decision
        if decision.fused:
            assert fusor is not None
            response = fusor.responses[None]
        else:
            response = calls.responses[decision.selected_index]
        chosen = _ai(response)
        messages = [result.message if m is chosen else m for m in response.result]
        answer = ModelResponse(result=messages, structured_response=response.structured_response)
        update = {
            CANDIDATES_KEY: [c.to_plain() for c in result.candidates],
            DECISION_KEY: decision.to_plain(),
        }
        return ExtendedModelResponse(model_response=answer, command=Command(update=update))

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: SyncHandler
    ) -> ExtendedModelResponse[Any]:
        step, calls, fusor = self._step(request, handler, None)
        conversation = _conversation(request)
        config = ensure_config()
        result = run_sync(lambda: step.run(request, conversation, config, sync=True))
        return self._answer(result, calls, fusor)

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: AsyncHandler
    ) -> ExtendedModelResponse[Any]:
        step, calls, fusor = self._step(request, None, handler)
        conversation = _conversation(request)
        config = ensure_config()
        result = await reraise_aborted(step.run(request, conversation, config, sync=False))
        return self._answer(result, calls, fusor)


def _conversation(request: ModelRequest[Any]) -> list[BaseMessage]:
    """What the critics and the decider are shown: the system message and the messages."""
    system = [request.system_message] if request.system_message is not None else []
    return [*system, *request.messages]


_STAND_IN: Runnable[Any, AIMessage] = RunnableLambda(
    lambda _: AIMessage(content=""), name="the agent's model"
)


class FusionMiddleware(_FanOutMiddleware):
    """Fusion-of-N for every model step of a ``create_agent`` agent.

    Args:
        n: Candidates per model step (1 to 256).
        fusor: The chat model that writes the answer; default the agent's own model. It is
            called through the agent's handler, bound to the request's tools (and response
            format), so the fused answer may call tools.
        prompt: The fusion prompt template.
        **options: ``critic``, ``critique_prompt``, ``min_candidates``,
            ``max_concurrency``, ``timeout``, ``retry``, ``fallback``, ``seed``,
            ``temperature``, ``grace``, ``max_total_tokens``, ``cost``: see
            :class:`~fusion_graph.options.FusionOptions` (``max_total_tokens`` bounds one
            model step, not the agent's whole run).

    Each step makes N handler calls for the candidates and one for the fusor (see the
    module docs for how that counts against LangChain's call limits).
    """

    def __init__(
        self,
        *,
        n: int,
        fusor: Any = None,
        prompt: PromptTemplate = FUSION_PROMPT,
        **options: Unpack[StepOptions],
    ) -> None:
        stand_in = _STAND_IN if fusor is None else fusor
        built = FusionOptions(n=n, strategy="fusion", fusor=stand_in, prompt=prompt, **options)
        super().__init__(built, fusor_is_model=fusor is None)


class BestOfNMiddleware(_FanOutMiddleware):
    """Best-of-N for every model step of a ``create_agent`` agent: the selector picks one
    candidate response, returned untouched (tool calls and structured response included).

    Args:
        n: Candidates per model step (1 to 256).
        selector: :class:`~fusion_graph.LLMJudge`, :class:`~fusion_graph.PairwiseJudge`,
            :class:`~fusion_graph.MajorityVote` (votes on the tool calls too), your own
            :class:`~fusion_graph.Selector`, or a reward function ``(messages, candidate)
            -> float``.
        **options: As for :class:`FusionMiddleware`.
    """

    def __init__(
        self, *, n: int, selector: Selector | RewardFn, **options: Unpack[StepOptions]
    ) -> None:
        super().__init__(FusionOptions(n=n, strategy="best_of_n", selector=selector, **options))
