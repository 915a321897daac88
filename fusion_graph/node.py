""":class:`FusionNode`: a wrapped LangGraph node (``state -> update``), made by
:func:`~fusion_graph.fusion_of_n` / :func:`~fusion_graph.best_of_n` from a node function.

Control flow inside a candidate
    LangGraph's control flow is never a failed candidate and is never retried. A candidate
    that calls ``interrupt()`` (``GraphInterrupt``) or sends a ``Command`` to the parent
    graph (``ParentCommand``) ends the step at once: the exception propagates, the
    candidates still running are abandoned (their results are dropped) and no decision is
    made. On resume (``Command(resume=...)``, with a checkpointer) LangGraph runs the node
    again from the start, as it does for any node; the candidates that had finished are
    read back from the checkpointer (:mod:`fusion_graph.durable`) and the others are made
    again; resume values go to ``interrupt()`` calls in the order they are reached
    (LangGraph's rule for several ``interrupt()`` calls in one node). So when k candidates
    interrupt, the step completes after at most k resumes. To ask a human once per step,
    call ``interrupt()`` in a node of its own before or after the wrapped one. A candidate
    that *returns* a ``Command`` is a candidate like any other (its ``update`` holds the
    reply): the node returns the winner's Command (for a fusion, the first successful
    candidate's) with the answer in its update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config
from langgraph.types import Command

from fusion_graph.messages import state_messages
from fusion_graph.nodes.generator import COMMAND_KEY
from fusion_graph.runtime import run_sync
from fusion_graph.step import FusionStep
from fusion_graph.types import FusionResult


class FusionNode(Runnable[Any, Any]):
    """A LangGraph node with the wrapped node's contract (``state -> partial update``).

    The update is the wrapped node's own update (the winner's, or for a fusion the first
    successful candidate's), with its last ``AIMessage`` replaced by the final answer; with
    ``candidates_key`` / ``decision_key`` it also holds the candidates (``list[Candidate]``)
    and the :class:`~fusion_graph.Decision` under those state keys (declare them in your
    state schema).
    """

    def __init__(
        self,
        step: FusionStep,
        name: str,
        *,
        candidates_key: str | None = None,
        decision_key: str | None = None,
    ) -> None:
        for option, key in (("candidates_key", candidates_key), ("decision_key", decision_key)):
            if key is not None and (not isinstance(key, str) or not key or key == "messages"):
                msg = f"{option} must be a state key other than 'messages', got {key!r}"
                raise ValueError(msg)
        if candidates_key is not None and candidates_key == decision_key:
            msg = f"candidates_key and decision_key must differ, both are {candidates_key!r}"
            raise ValueError(msg)
        self.step = step
        self.name = name
        self.__name__ = name
        self.candidates_key = candidates_key
        self.decision_key = decision_key

    def _update(self, result: FusionResult) -> dict[str, Any] | Command[Any]:
        update = dict(result.update or {})
        command = update.pop(COMMAND_KEY, None)
        messages = update.get("messages")
        items = list(messages) if isinstance(messages, Sequence) else [messages]
        for i in range(len(items) - 1, -1, -1):
            if isinstance(items[i], AIMessage):
                items[i] = result.message
                break
        else:
            items = [result.message]
        update["messages"] = items
        if self.candidates_key is not None:
            update[self.candidates_key] = list(result.candidates)
        if self.decision_key is not None:
            update[self.decision_key] = result.decision
        if isinstance(command, Command):
            return Command(graph=command.graph, update=update, goto=command.goto)
        return update

    def _run(self, state: Any, config: RunnableConfig) -> dict[str, Any] | Command[Any]:
        conversation = state_messages(state)
        result = run_sync(lambda: self.step.run(state, conversation, config, sync=True))
        return self._update(result)

    async def _arun(self, state: Any, config: RunnableConfig) -> dict[str, Any] | Command[Any]:
        conversation = state_messages(state)
        return self._update(await self.step.run(state, conversation, config, sync=False))

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(cast("Any", self._run), input, ensure_config(config))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        arun = cast("Any", self._arun)
        return await self._acall_with_config(arun, input, ensure_config(config))

    def __call__(self, state: Any, config: RunnableConfig | None = None) -> Any:
        """Call it like the node it wraps."""
        return self.invoke(state, config)
