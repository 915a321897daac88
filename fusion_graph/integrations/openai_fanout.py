"""One-request fan-out for OpenAI-compatible chat models: the N candidates of a fan-out asked
for with ``n=k``, with a fallback for servers that ignore or reject ``n``.

Fan-out
    :class:`ChatOpenAIFanOut` is a ``langchain_openai.ChatOpenAI`` that also implements
    :class:`~fusion_graph.nodes.fanout.SupportsSampleN`, so fusion-graph hands it all the
    candidates it makes in ONE call, ``sample_n(messages, seeds=[...])``. It then asks the
    server for them in one request with ``n=k`` (the prompt is processed once, and vLLM
    decodes the k samples as one batch) and splits the choices into k replies, each with its
    own share of the usage. A backend that ignores ``n`` answers with fewer choices (llama.cpp's
    server returns one); the missing ones are then made by extra concurrent requests, and the
    endpoint is remembered as one that ignores ``n``, so later fan-outs go straight to k
    parallel requests. ``supports_n=False`` skips the ``n`` request altogether; ``True`` trusts
    the server (no extra requests are made even if it returns fewer choices: those candidates
    fail).

Seeds
    A request carries one seed. The ``n=k`` request uses the first candidate's seed (vLLM still
    gives k distinct samples); every separate request uses its own candidate's seed. Servers
    that reject ``seed`` can be used with ``supports_seed=False``.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration
from langchain_core.runnables import RunnableConfig, ensure_config

from fusion_graph.integrations.endpoint_limits import endpoint_key
from fusion_graph.integrations.untraced import finish, unobserved
from fusion_graph.integrations.usage import split_usage
from fusion_graph.runtime import THREAD_POOL

try:
    import openai
    from langchain_openai import ChatOpenAI
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    msg = (
        "OpenAI-compatible endpoints need langchain-openai; install it with "
        "`pip install 'fusion-graph[openai]'`."
    )
    raise ImportError(msg) from exc

__all__ = ["ChatOpenAIFanOut", "forget_ignores_n"]

T = TypeVar("T")

# What this process learned: (endpoint, model) pairs whose server ignores or rejects n.
_REGISTRY_LOCK = threading.Lock()
_IGNORES_N: dict[tuple[str, str], bool] = {}


def forget_ignores_n(endpoint: str) -> None:
    """Forget which models of ``endpoint`` (an :func:`endpoint_key`) were found to ignore
    ``n``."""
    with _REGISTRY_LOCK:
        for known in [k for k in _IGNORES_N if k[0] == endpoint]:
            del _IGNORES_N[known]


class ChatOpenAIFanOut(ChatOpenAI):
    """``ChatOpenAI`` that makes the N candidates of a fan-out in one ``n=k`` request when the
    server honours ``n``, else (or for what it left out) in separate concurrent requests, each
    with its own seed. :class:`~fusion_graph.integrations.openai_compat.ChatOpenAICompatible`
    adds the per-endpoint bound on requests in flight."""

    supports_n: bool | None = None
    """Whether the server honours ``n``: None tries and detects (fewer choices than asked
    means no, and the rest is filled with extra requests); False always sends separate
    requests; True always trusts one request."""
    supports_seed: bool = True
    """Send each request's ``seed``; turn off for servers that reject the field."""

    @property
    def endpoint(self) -> str:
        """The base URL requests go to (the key of what is learned about the server)."""
        return endpoint_key(self.openai_api_base)

    def _ignores_n(self) -> bool:
        if self.supports_n is not None:
            return not self.supports_n
        return _IGNORES_N.get((self.endpoint, self.model_name), False)

    def sample_n(
        self, messages: LanguageModelInput, *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        """Make ``len(seeds)`` replies to ``messages``: one request with ``n=k`` when the server
        honours ``n``, else (or for what it left out) separate concurrent requests.

        ``kwargs`` are call options (``temperature``, ``max_tokens``, ``stop``, ...). A reply
        that could not be made is that element's exception; when the ``n=k`` request itself
        fails, this raises (so the caller's retry policy applies to the whole group).

        Each reply's ``response_metadata`` holds ``seed`` (the seed of the request that made
        it), ``request_n`` (the ``n`` of that request), ``choice_index``, ``latency_s`` (that
        request's own time), ``queue_s`` (the time it waited for a slot of the endpoint, when
        the model bounds them; else 0) and ``usage_split`` (True when its usage is a share of
        the request's).
        """
        messages_ = self._convert_input(messages).to_messages()
        k = len(seeds)
        if k == 0:
            return []
        replies: list[AIMessage | Exception] = []
        if k > 1 and not self._ignores_n():
            try:
                replies = self._n_request(messages_, seeds, kwargs)
            except openai.BadRequestError as exc:
                if not self._learn_rejects_n(exc):
                    raise
        missing = list(range(len(replies), k))
        quiet = unobserved(self, ensure_config()) if missing else False  # once for them all
        futures = [
            THREAD_POOL.submit(_in_context(self._single), messages_, seeds[i], kwargs, quiet)
            for i in missing
        ]
        for future in futures:
            replies.append(future.result())
        return replies

    async def asample_n(
        self, messages: LanguageModelInput, *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        """Async :meth:`sample_n`."""
        messages_ = self._convert_input(messages).to_messages()
        k = len(seeds)
        if k == 0:
            return []
        replies: list[AIMessage | Exception] = []
        if k > 1 and not self._ignores_n():
            try:
                replies = await self._an_request(messages_, seeds, kwargs)
            except openai.BadRequestError as exc:
                if not self._learn_rejects_n(exc):
                    raise
        missing = range(len(replies), k)
        if missing:
            quiet = unobserved(self, ensure_config())  # once for them all
            replies += await self._aseparate(messages_, [seeds[i] for i in missing], kwargs, quiet)
        return replies

    async def _aseparate(
        self,
        messages: list[BaseMessage],
        seeds: Sequence[int | None],
        kwargs: dict[str, Any],
        quiet: bool,
    ) -> list[AIMessage | Exception]:
        """One request per seed, all at once (a subclass may build them more cheaply)."""
        return list(
            await asyncio.gather(*(self._asingle(messages, seed, kwargs, quiet) for seed in seeds))
        )

    def _remember_ignores_n(self) -> None:
        with _REGISTRY_LOCK:
            _IGNORES_N[(self.endpoint, self.model_name)] = True

    def _learn_rejects_n(self, exc: openai.BadRequestError) -> bool:
        """Whether the 400 answer to an ``n=k`` request means the server rejects ``n > 1``
        (while detecting): then it is remembered, and never asked again."""
        if self.supports_n is not None or not _rejects_n(exc):
            return False
        self._remember_ignores_n()
        return True

    def _call_kwargs(self, seed: int | None, kwargs: dict[str, Any], n: int) -> dict[str, Any]:
        if "seed" in kwargs or "n" in kwargs:
            msg = "sample_n takes one seed per candidate; pass seeds=[...], not seed= or n=."
            raise TypeError(msg)
        call: dict[str, Any] = {**kwargs, "stream": False}
        if seed is not None and self.supports_seed:
            call["seed"] = seed
        if n > 1:
            call["n"] = n
        return call

    def _n_request(
        self, messages: list[BaseMessage], seeds: Sequence[int | None], kwargs: dict[str, Any]
    ) -> list[AIMessage | Exception]:
        call = self._call_kwargs(seeds[0], kwargs, len(seeds))
        start = time.perf_counter()
        generations = self._chat(messages, call)
        return self._split(generations, seeds, kwargs, time.perf_counter() - start)

    async def _an_request(
        self, messages: list[BaseMessage], seeds: Sequence[int | None], kwargs: dict[str, Any]
    ) -> list[AIMessage | Exception]:
        call = self._call_kwargs(seeds[0], kwargs, len(seeds))
        start = time.perf_counter()
        generations = await self._achat(messages, call)
        return self._split(generations, seeds, kwargs, time.perf_counter() - start)

    def _chat(
        self, messages: list[BaseMessage], call: dict[str, Any], quiet: bool | None = None
    ) -> list[ChatGeneration]:
        """One request's replies: ``_generate`` directly when nobody listens (``quiet``, found
        out here when None; see :mod:`~fusion_graph.integrations.untraced`), else a run of
        ``generate`` under the callbacks, tags and metadata of the run this call is part of."""
        config = ensure_config()
        if quiet if quiet is not None else unobserved(self, config):
            return _chat_generations(finish(self._generate(messages, **call)).generations)
        result = self.generate([messages], **_run_options(config), **call)
        return _chat_generations(result.generations[0])

    async def _achat(
        self, messages: list[BaseMessage], call: dict[str, Any], quiet: bool | None = None
    ) -> list[ChatGeneration]:
        """Async :meth:`_chat`."""
        config = ensure_config()
        if quiet if quiet is not None else unobserved(self, config):
            result = finish(await self._agenerate(messages, **call))
            return _chat_generations(result.generations)
        llm_result = await self.agenerate([messages], **_run_options(config), **call)
        return _chat_generations(llm_result.generations[0])

    def _split(
        self,
        generations: list[ChatGeneration],
        seeds: Sequence[int | None],
        kwargs: dict[str, Any],
        latency_s: float,
    ) -> list[AIMessage | Exception]:
        """The choices of one ``n=k`` response as separate replies (at most k)."""
        k = len(seeds)
        generations = generations[:k]
        if len(generations) < k and self.supports_n is None:
            self._remember_ignores_n()  # fewer choices than asked: the server ignores n
        messages: list[AIMessage] = []
        finish: list[str | None] = []
        exact: list[int | None] = []
        for generation in generations:
            message = getattr(generation, "message", None)
            if not isinstance(message, AIMessage):
                msg = "The server answered with a choice that is not a chat message."
                raise TypeError(msg)
            info = generation.generation_info or {}
            messages.append(message)
            finish.append(info.get("finish_reason"))
            logprobs = info.get("logprobs")
            content = logprobs.get("content") if isinstance(logprobs, dict) else None
            exact.append(len(content) if isinstance(content, list) else None)
        usage = messages[0].usage_metadata if messages else None
        timing = _timing(messages[0] if messages else None, latency_s)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        shares = split_usage(usage, messages, finish, max_tokens, exact)
        replies: list[AIMessage | Exception] = []
        for index, (message, share) in enumerate(zip(messages, shares, strict=True)):
            metadata = {
                **message.response_metadata,
                "model_name": self.model_name,
                "finish_reason": finish[index],
                "seed": seeds[0],
                "request_n": k,
                "choice_index": index,
                **timing,
                "usage_split": share is not None,
            }
            replies.append(
                message.model_copy(update={"usage_metadata": share, "response_metadata": metadata})
            )
        if self.supports_n:
            replies += [
                RuntimeError(
                    f"The server returned {len(messages)} choices for n={k}; create the model "
                    "with supports_n=None (detect) or False so the rest are requested "
                    "separately."
                )
                for _ in range(k - len(messages))
            ]
        return replies

    def _single(
        self, messages: list[BaseMessage], seed: int | None, kwargs: dict[str, Any], quiet: bool
    ) -> AIMessage | Exception:
        call = self._call_kwargs(seed, kwargs, 1)
        start = time.perf_counter()
        try:
            generations = self._chat(messages, call, quiet)
            return self._one(generations, seed, time.perf_counter() - start)
        except Exception as exc:  # one candidate's failure is that candidate's
            return exc

    async def _asingle(
        self, messages: list[BaseMessage], seed: int | None, kwargs: dict[str, Any], quiet: bool
    ) -> AIMessage | Exception:
        call = self._call_kwargs(seed, kwargs, 1)
        return await self._aone(seed, lambda: self._achat(messages, call, quiet))

    async def _aone(
        self, seed: int | None, send: Callable[[], Awaitable[list[ChatGeneration]]]
    ) -> AIMessage | Exception:
        """The reply of one request of one seed that ``send`` makes (its error, if it fails)."""
        start = time.perf_counter()
        try:
            generations = await send()
            return self._one(generations, seed, time.perf_counter() - start)
        except Exception as exc:  # one candidate's failure is that candidate's
            return exc

    def _one(
        self, generations: list[ChatGeneration], seed: int | None, latency_s: float
    ) -> AIMessage:
        generation = generations[0]
        message = getattr(generation, "message", None)
        if not isinstance(message, AIMessage):
            msg = "The server answered with a choice that is not a chat message."
            raise TypeError(msg)
        metadata = {
            **message.response_metadata,
            "seed": seed,
            "request_n": 1,
            "choice_index": 0,
            **_timing(message, latency_s),
            "usage_split": False,
        }
        return message.model_copy(update={"response_metadata": metadata})


def _timing(message: AIMessage | None, measured_s: float) -> dict[str, float]:
    """``latency_s`` and ``queue_s`` of a reply: what the model recorded (the request's own
    time, and its wait for a slot), else the time measured around the call, with no wait."""
    meta = message.response_metadata if message is not None else {}
    queue = meta.get("queue_s")
    latency = meta.get("latency_s")
    return {
        "latency_s": float(latency) if isinstance(latency, int | float) else measured_s,
        "queue_s": float(queue) if isinstance(queue, int | float) else 0.0,
    }


def _chat_generations(generations: Sequence[Any]) -> list[ChatGeneration]:
    if not all(isinstance(g, ChatGeneration) for g in generations):
        msg = "The server answered with a choice that is not a chat message."
        raise TypeError(msg)
    return list(generations)


def _run_options(config: RunnableConfig) -> dict[str, Any]:
    """The callbacks, tags and metadata of the run this call is part of."""
    return {
        "callbacks": config.get("callbacks"),
        "tags": config.get("tags"),
        "metadata": config.get("metadata"),
    }


def _in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run in a copy of the caller's context (so the run's config follows it)."""
    ctx = contextvars.copy_context()

    def run(*args: Any) -> T:
        return ctx.run(fn, *args)

    return run


# Ways a 400 answer names the request's ``n`` field as the problem. The letter alone is not
# enough ("n/a", "n tokens", an escaped newline in echoed content are about something else):
# it must be quoted ('n', "n", `n`), named as the parameter (param: n, parameter n, body.n, a
# line starting "n:"), or be the subject of a constraint (n must be 1, n > 1 is not
# supported, n=2: must be 1, only n=1, ...); or the message says only one choice is allowed
# (llama.cpp's server).
_N_ALONE = r"(?-i:n)(?![\w-])"
_N = r"(?<![\w.\\-])" + _N_ALONE
_CONSTRAINT = (
    r"(?:must|should|has\s+to|can(?:not|'t)?|may\s+not|(?:is|are)\s+not|isn't|only|"
    r"(?:is\s+)?(?:not\s+)?(?:supported|unsupported|allowed|permitted|invalid|restricted)|"
    r"greater|larger|exceeds?|out\s+of\s+range)\b"
)
_N_REJECTION = re.compile(
    "|".join(
        [
            r"(?<![\w\\])['\"`](?-i:n)['\"`](?![\w-])",
            rf"\b(?:param(?:eter)?|field|argument|option|body)s?(?:\s*[:=]\s*|\s+|\.){_N_ALONE}",
            rf"(?m:^)\s*{_N}\s*:",
            rf"{_N}(?:\s*(?:==|>=|<=|!=|=|>|<)\s*\d+)?[\s:,]+{_CONSTRAINT}",
            rf"\bonly\s+(?:supports?\s+)?{_N}\s*==?\s*1\b",
            r"\bonly\s+one\s+(?:completion\s+|chat\s+)?(?:choice|completion)s?\s+(?:is|are)\s+"
            r"(?:allowed|supported)",
            r"\bmultiple\s+(?:completion\s+)?choices\s+(?:are\s+)?not\s+supported",
        ]
    ),
    re.IGNORECASE,
)


def _rejects_n(exc: openai.BadRequestError) -> bool:
    """Whether a 400 answer is about the ``n`` field (a server that only allows n=1): the
    error's ``param`` says so, or (when it names no parameter) its message does."""
    param = getattr(exc, "param", None)
    if param:
        return str(param).rsplit(".", 1)[-1] == "n"
    return bool(_N_REJECTION.search(exc.message))
