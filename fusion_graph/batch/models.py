"""Models of a batch job: parsing model specs, calling them under per-endpoint bounds,
and going through the candidate store first (record and replay).

A *model spec* names a model on the command line::

    local[:OPTS]                       the embedded model (SmolLM2-135M-Instruct, CPU)
    openai:URL:MODEL[:OPTS]            any OpenAI-compatible server (vLLM, llama.cpp server, ...)
    vllm:URL:MODEL[:OPTS]              a vLLM server: a prompt's k samples in one request (n=k)

``URL`` may list replicas of one model joined by ``+`` (``http://a:8000/v1+http://b:8000/v1``):
each call goes to the replica with the fewest calls in flight. ``OPTS`` is
``key=value,key=value`` with ``temperature``, ``top_p``, ``max_tokens``, ``seed`` (sampling:
these key the store), ``name`` (the teacher's column name), ``concurrency`` (calls in flight
per endpoint), ``timeout`` (seconds per call), ``api_key_env`` and, for ``local``, ``path``
(another chat GGUF file).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.types import RetryPolicy

from fusion_graph.batch.data import PromptItem
from fusion_graph.batch.store import CandidateStore, call_key, settings_hash
from fusion_graph.nodes.calls import Caller, CallResult, run_sync
from fusion_graph.prompts import message_text
from fusion_graph.state import Candidate, ErrorInfo, TokenUsage
from fusion_graph.wrap import to_messages

Kind = Literal["local", "openai", "vllm"]
KINDS: tuple[Kind, ...] = ("local", "openai", "vllm")

SPEC_HELP = (
    "A model spec is 'local[:OPTS]' (the embedded model), 'openai:URL:MODEL[:OPTS]' (any "
    "OpenAI-compatible server) or 'vllm:URL:MODEL[:OPTS]' (a vLLM server; a prompt's samples "
    "in one request). URL may join replicas of one model with '+'. OPTS is key=value,... "
    "with temperature, top_p, max_tokens, seed, name, concurrency (calls in flight per "
    "endpoint), timeout, api_key_env, path (local GGUF). E.g. local:temperature=0.3,name=a"
)

_OPTIONS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "max_tokens": int,
    "seed": int,
    "name": str,
    "concurrency": int,
    "timeout": float,
    "api_key_env": str,
    "path": str,
}
_URLS = re.compile(
    r"^(?P<urls>https?://[^/\s:+]+(?::\d+)?[^\s:+]*(?:\+https?://[^/\s:+]+(?::\d+)?[^\s:+]*)*)"
    r":(?P<rest>.+)$"
)


def _parse_options(text: str, spec: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _OPTIONS:
            msg = (
                f"model spec {spec!r}: {part!r} is not an option; options are "
                f"{', '.join(sorted(_OPTIONS))} (key=value, comma separated)"
            )
            raise ValueError(msg)
        try:
            options[key] = _OPTIONS[key](value.strip())
        except ValueError:
            msg = f"model spec {spec!r}: {key} needs a {_OPTIONS[key].__name__}, got {value!r}"
            raise ValueError(msg) from None
    for key in ("max_tokens", "concurrency"):
        if key in options and options[key] < 1:
            msg = f"model spec {spec!r}: {key} must be at least 1"
            raise ValueError(msg)
    if options.get("temperature", 0) < 0 or not 0 < options.get("top_p", 1) <= 1:
        msg = f"model spec {spec!r}: temperature must be >= 0 and top_p in (0, 1]"
        raise ValueError(msg)
    return options


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A parsed model spec (see the module docs)."""

    kind: Kind
    urls: tuple[str, ...] = ()
    model: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``text``; ``ValueError`` with a hint when it is malformed."""
        spec = text.strip()
        kind, _, rest = spec.partition(":")
        if kind not in KINDS:
            msg = f"model spec {text!r} must start with local, openai: or vllm:. {SPEC_HELP}"
            raise ValueError(msg)
        if kind == "local":
            options = _parse_options(rest, text)
            if "path" in options and not Path(options["path"]).expanduser().is_file():
                msg = f"model spec {text!r}: no GGUF file at {options['path']}"
                raise ValueError(msg)
            return cls(kind="local", options=options, text=spec)
        found = _URLS.match(rest)
        if found is None:
            msg = (
                f"model spec {text!r}: expected {kind}:URL:MODEL[:OPTS], e.g. "
                f"{kind}:http://127.0.0.1:8000/v1:Qwen/Qwen2.5-7B-Instruct:temperature=0.3"
            )
            raise ValueError(msg)
        model, options_text = found["rest"], ""
        head, sep, tail = model.rpartition(":")
        if sep and "=" in tail:
            model, options_text = head, tail
        if not model.strip():
            msg = f"model spec {text!r}: the model name is missing"
            raise ValueError(msg)
        if "path" in _parse_options(options_text, text):
            msg = f"model spec {text!r}: path= is for local models only"
            raise ValueError(msg)
        return cls(
            kind=cast("Kind", kind),
            urls=tuple(found["urls"].split("+")),
            model=model.strip(),
            options=_parse_options(options_text, text),
            text=spec,
        )

    def with_defaults(self, **values: Any) -> ModelSpec:
        """This spec with ``values`` for the options it does not set itself."""
        merged = {**{k: v for k, v in values.items() if v is not None}, **self.options}
        return ModelSpec(
            kind=self.kind, urls=self.urls, model=self.model, options=merged, text=self.text
        )

    def with_options(self, **values: Any) -> ModelSpec:
        """This spec with ``values`` overriding its own options."""
        merged = {**self.options, **{k: v for k, v in values.items() if v is not None}}
        return ModelSpec(
            kind=self.kind, urls=self.urls, model=self.model, options=merged, text=self.text
        )


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """What a spec gets for the options it leaves out."""

    temperature: float
    max_tokens: int
    seed: int = 0
    top_p: float | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float | None = None
    retries: int = 1
    """Extra attempts after a failed call (with backoff)."""
    endpoint_concurrency: int = 8
    """Calls in flight per remote endpoint (the embedded model takes one at a time)."""


@dataclass
class JobStats:
    """Counters of one job, updated as it goes (single event loop: no lock needed)."""

    requests: int = 0
    """Model requests made (a batched request for k samples counts once)."""
    generated: int = 0
    """Candidates generated by this run."""
    replayed: int = 0
    """Candidates read from the store instead."""
    failed: int = 0
    """Candidates that failed (after retries)."""
    recorded_calls: int = 0
    """Decision calls (fusor, judges) made and recorded."""
    replayed_calls: int = 0
    """Decision calls answered from the store."""
    input_tokens: int = 0
    output_tokens: int = 0
    """Tokens of the requests made by this run (replayed ones cost nothing)."""
    started: float = field(default_factory=time.perf_counter)

    def add_usage(self, message: AIMessage) -> None:
        usage = TokenUsage.of(message)
        if usage is not None:
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "candidates_generated": self.generated,
            "candidates_replayed": self.replayed,
            "candidates_failed": self.failed,
            "decision_calls_made": self.recorded_calls,
            "decision_calls_replayed": self.replayed_calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3),
        }


class Endpoints:
    """Concurrency bounds shared by every model on one endpoint (URL, or the embedded
    model). The first bound registered for an endpoint wins."""

    def __init__(self) -> None:
        self._bounds: dict[str, asyncio.Semaphore] = {}
        self.limits: dict[str, int] = {}

    def bound(self, endpoint: str, limit: int) -> asyncio.Semaphore:
        if endpoint not in self._bounds:
            self._bounds[endpoint] = asyncio.Semaphore(limit)
            self.limits[endpoint] = limit
        return self._bounds[endpoint]


@dataclass(eq=False)
class Replica:
    """One server (or the embedded model) serving a handle's model."""

    model: Any
    """A LangChain chat model (anything with ``ainvoke``; ``asample_n`` / ``agenerate``
    for batched sampling)."""
    endpoint: str
    semaphore: asyncio.Semaphore
    in_flight: int = 0


Reply = CallResult[AIMessage]


def _reply(value: AIMessage | None, error: Exception | None, of: CallResult[Any]) -> Reply:
    # Not Reply(...): calling a subscripted slots dataclass fails (typing sets __orig_class__).
    result: Reply = CallResult(value, error, of.attempts, of.latency_s)
    return result


class ModelHandle:
    """A model of a job: its identity in the store, its sampling settings, its replicas,
    and how to call it (per-call timeout and retries, per-endpoint bound)."""

    def __init__(
        self,
        *,
        name: str,
        model_id: str,
        settings: Mapping[str, Any],
        replicas: Sequence[Replica],
        batched: Literal["sample_n", "n", None] = None,
        timeout: float | None = None,
        retries: int = 0,
        spec: ModelSpec | None = None,
    ) -> None:
        if not replicas:
            msg = "a model needs at least one replica"
            raise ValueError(msg)
        self.name = name
        """Column name (synth) / display name."""
        self.model_id = model_id
        """The model's name, part of the store key."""
        self.settings = dict(settings)
        """Sampling settings (temperature, top_p, max_tokens, seed), part of the store key."""
        self.settings_hash = settings_hash(self.settings)
        self.replicas = list(replicas)
        self.batched = batched
        self.timeout = timeout
        self.retries = retries
        self.spec = spec

    def __repr__(self) -> str:
        return f"ModelHandle({self.name!r}, model={self.model_id!r}, settings={self.settings})"

    @property
    def seed(self) -> int:
        return int(self.settings.get("seed") or 0)

    def _options(self) -> dict[str, Any]:
        top_p = self.settings.get("top_p")
        return {"top_p": top_p} if top_p is not None else {}

    def _pick(self) -> Replica:
        return min(self.replicas, key=lambda r: r.in_flight)

    async def _on_replica(self, make: Any) -> CallResult[Any]:
        replica = self._pick()
        replica.in_flight += 1
        policy = RetryPolicy(max_attempts=self.retries + 1) if self.retries else None
        caller = Caller(sync=False, timeout=self.timeout, retry=policy, semaphore=replica.semaphore)
        try:
            return await caller.call(None, lambda: make(replica.model))
        finally:
            replica.in_flight -= 1

    async def call(
        self,
        messages: Sequence[BaseMessage],
        *,
        stats: JobStats,
        seed: int | None = None,
        config: RunnableConfig | None = None,
        **options: Any,
    ) -> Reply:
        """One request; the result carries the reply or the last error (never raises)."""
        kwargs = {**self._options(), "seed": self.seed if seed is None else seed, **options}

        async def make(model: Any) -> AIMessage:
            stats.requests += 1
            reply = await model.ainvoke(list(messages), config, **kwargs)
            if not isinstance(reply, AIMessage):
                msg = f"{self.name} returned {type(reply).__name__}, expected an AIMessage"
                raise TypeError(msg)
            stats.add_usage(reply)
            return reply

        result: Reply = await self._on_replica(make)
        return result

    async def sample(
        self, messages: Sequence[BaseMessage], seeds: Sequence[int], *, stats: JobStats
    ) -> list[Reply]:
        """``len(seeds)`` independent samples: one batched request where the model can
        (embedded model: ``sample_n``; vLLM: ``n=k``), else one request each, at once."""
        if len(seeds) < 2 or self.batched is None:
            return list(
                await asyncio.gather(*(self.call(messages, stats=stats, seed=s) for s in seeds))
            )
        options = self._options()

        async def make(model: Any) -> list[AIMessage | Exception]:
            stats.requests += 1
            if self.batched == "sample_n":
                replies: list[AIMessage | Exception] = await model.asample_n(
                    list(messages), seeds=list(seeds), **options
                )
            else:
                replies = await _openai_sample_n(model, messages, seeds, options)
            for reply in replies:
                if isinstance(reply, AIMessage):
                    stats.add_usage(reply)
            return replies

        batch: CallResult[list[AIMessage | Exception]] = await self._on_replica(make)
        if batch.error is not None or batch.value is None:
            error = batch.error or RuntimeError("no replies")
            return [_reply(None, error, batch) for _ in seeds]
        return [
            _reply(None, r, batch) if isinstance(r, Exception) else _reply(r, None, batch)
            for r in batch.value
        ]


async def _openai_sample_n(
    model: Any, messages: Sequence[BaseMessage], seeds: Sequence[int], options: Mapping[str, Any]
) -> list[AIMessage | Exception]:
    """k samples in one chat-completions request (``n=k``; the server prefills once).
    The request's usage is shared out: prompt tokens on the first sample (prefilled once),
    completion tokens split evenly."""
    k = len(seeds)
    result = await model.agenerate([list(messages)], n=k, seed=seeds[0], **options)
    generations = [cast("ChatGeneration", g) for g in result.generations[0]]
    if len(generations) != k:
        msg = f"asked the server for {k} samples (n={k}), it returned {len(generations)}"
        raise RuntimeError(msg)
    replies: list[AIMessage | Exception] = []
    usage = (
        generations[0].message.usage_metadata
        if isinstance(generations[0].message, AIMessage)
        else None
    )
    prompt = usage.get("input_tokens", 0) if usage else 0
    completion = usage.get("output_tokens", 0) if usage else 0
    for j, generation in enumerate(generations):
        message = generation.message
        if not isinstance(message, AIMessage):
            replies.append(TypeError(f"sample {j} is a {type(message).__name__}"))
            continue
        if usage:
            out = completion // k + (1 if j < completion % k else 0)
            inp = prompt if j == 0 else 0
            message = message.model_copy(
                update={
                    "usage_metadata": {
                        "input_tokens": inp,
                        "output_tokens": out,
                        "total_tokens": inp + out,
                    }
                }
            )
        replies.append(message)
    return replies


# --- building handles --------------------------------------------------------------------------


def _settings(spec: ModelSpec, defaults: Defaults) -> dict[str, Any]:
    return {
        "temperature": float(spec.options.get("temperature", defaults.temperature)),
        "top_p": spec.options.get("top_p", defaults.top_p),
        "max_tokens": int(spec.options.get("max_tokens", defaults.max_tokens)),
        "seed": int(spec.options.get("seed", defaults.seed)),
    }


def _build_model(spec: ModelSpec, url: str | None, settings: Mapping[str, Any], d: Defaults) -> Any:
    from fusion_graph.cli import ModelChoice  # the `ask` command's model builder

    choice = ModelChoice(
        model=spec.model,
        base_url=url,
        api_key_env=str(spec.options.get("api_key_env", d.api_key_env)),
        temperature=float(settings["temperature"]),
        max_tokens=int(settings["max_tokens"]),
        timeout=spec.options.get("timeout", d.timeout),
    )
    model: BaseChatModel = choice.build()
    if spec.kind == "local" and "path" in spec.options:
        path = Path(spec.options["path"]).expanduser()
        model = model.model_copy(update={"model_path": str(path), "model_name": path.stem})
    return model.model_copy(update={"seed": settings["seed"]})


def build_handle(
    spec: ModelSpec, defaults: Defaults, endpoints: Endpoints, *, name: str | None = None
) -> ModelHandle:
    """A :class:`ModelHandle` for ``spec`` (models are built, not called)."""
    settings = _settings(spec, defaults)
    urls: tuple[str | None, ...] = spec.urls or (None,)
    replicas = []
    for url in urls:
        model = _build_model(spec, url, settings, defaults)
        if url is None:
            bound = endpoints.bound("local", 1)
        else:
            limit = int(spec.options.get("concurrency", defaults.endpoint_concurrency))
            bound = endpoints.bound(url, limit)
        replicas.append(Replica(model=model, endpoint=url or "local", semaphore=bound))
    first = replicas[0].model
    model_id = spec.model or str(getattr(first, "model_name", "local"))
    batched: Literal["sample_n", "n", None] = None
    if spec.kind == "local":
        batched = "sample_n"
    elif spec.kind == "vllm":
        batched = "n"
    return ModelHandle(
        name=str(spec.options.get("name") or name or model_id),
        model_id=model_id,
        settings=settings,
        replicas=replicas,
        batched=batched,
        timeout=spec.options.get("timeout", defaults.timeout),
        retries=defaults.retries,
        spec=spec,
    )


RESERVED_NAMES = frozenset(
    {
        "id",
        "prompt",
        "language_code",
        "input_hash",
        "teachers",
        "candidates",
        "failed_teachers",
        "BoN",
        "BoN_teacher",
        "BoN_selector",
        "BoN_scores",
        "BoN_fallback",
        "Fusion",
        "fusor",
        "Fusion_fallback",
        "usage",
        "seconds",
    }
)


def build_pool(
    specs: Sequence[ModelSpec], defaults: Defaults, endpoints: Endpoints
) -> list[ModelHandle]:
    """Handles for a pool of teachers, with unique names (``name=`` or the model name,
    ``-2``, ``-3`` ... for repeats). Two teachers with the same model and sampling
    settings would give identical candidates: that is an error."""
    handles: list[ModelHandle] = []
    names: set[str] = set()
    keys: dict[tuple[str, str], str] = {}
    for spec in specs:
        handle = build_handle(spec, defaults, endpoints)
        base = handle.name
        if base in RESERVED_NAMES:
            msg = f"teacher name {base!r} is a reserved column name; pick another with name="
            raise ValueError(msg)
        name, k = base, 1
        while name in names:
            if "name" in spec.options:
                msg = f"two teachers are named {base!r}; names must be unique"
                raise ValueError(msg)
            k += 1
            name = f"{base}-{k}"
        handle.name = name
        names.add(name)
        key = (handle.model_id, handle.settings_hash)
        if key in keys:
            msg = (
                f"teachers {keys[key]!r} and {name!r} are the same model with the same "
                "sampling settings, so they would give the same candidates; give one "
                "another temperature= or seed="
            )
            raise ValueError(msg)
        keys[key] = name
        handles.append(handle)
    return handles


# --- the pool of candidate makers, through the store -----------------------------------------


@dataclass(frozen=True, kw_only=True)
class CandidateSet:
    """The candidates of one prompt, index order, failures included."""

    candidates: list[Candidate]
    replayed: frozenset[int]
    """Indices read from the store."""
    teachers: list[str]
    """The teacher (handle name) of each index."""


def prompt_messages(item: PromptItem) -> list[BaseMessage]:
    """What every model is sent for a prompt: the prompt as one user message."""
    return [HumanMessage(item.prompt)]


class Pool:
    """Makes candidates for prompts: candidate ``i`` comes from ``handles[i % len]`` (its
    ``i // len``-th sample, seed ``seed + i // len``), read from the store when it is there,
    else generated and recorded."""

    def __init__(
        self, handles: Sequence[ModelHandle], store: CandidateStore, stats: JobStats
    ) -> None:
        if not handles:
            msg = "the pool needs at least one model"
            raise ValueError(msg)
        self.handles = list(handles)
        self.store = store
        self.stats = stats

    async def candidates(self, item: PromptItem, n: int) -> CandidateSet:
        plan: dict[int, list[tuple[int, int]]] = {}
        for i in range(n):
            plan.setdefault(i % len(self.handles), []).append((i, i // len(self.handles)))
        parts = await asyncio.gather(
            *(self._from(self.handles[slot], item, pairs) for slot, pairs in plan.items())
        )
        by_index: dict[int, tuple[Candidate, bool]] = {}
        for part in parts:
            by_index.update(part)
        ordered = [by_index[i] for i in range(n)]
        return CandidateSet(
            candidates=[c for c, _ in ordered],
            replayed=frozenset(i for i, (_, hit) in enumerate(ordered) if hit),
            teachers=[self.handles[i % len(self.handles)].name for i in range(n)],
        )

    async def _from(
        self, handle: ModelHandle, item: PromptItem, pairs: list[tuple[int, int]]
    ) -> dict[int, tuple[Candidate, bool]]:
        local_of = {glob: local for glob, local in pairs}
        stored = self.store.get_candidates(
            prompt_id=item.id,
            model=handle.model_id,
            settings=handle.settings_hash,
            indices=local_of.values(),
            input_hash=item.input_hash,
        )
        out: dict[int, tuple[Candidate, bool]] = {}
        missing: list[tuple[int, int]] = []
        for glob, local in pairs:
            hit = stored.get(local)
            if hit is None:
                missing.append((glob, local))
                continue
            self.stats.replayed += 1
            candidate = Candidate(
                index=glob,
                model=handle.name,
                message=hit.message,
                text=message_text(hit.message),
                usage=TokenUsage.of(hit.message),
                latency_s=hit.latency_s,
                seed=hit.seed,
            )
            out[glob] = (candidate, True)
        if not missing:
            return out
        seeds = [handle.seed + local for _, local in missing]
        replies = await handle.sample(prompt_messages(item), seeds, stats=self.stats)
        for (glob, local), seed, reply in zip(missing, seeds, replies, strict=True):
            base = {
                "index": glob,
                "model": handle.name,
                "latency_s": reply.latency_s,
                "attempts": reply.attempts,
                "seed": seed,
            }
            message = reply.value
            error = reply.error
            if error is None and (message is None or not message_text(message).strip()):
                error = ValueError("the model returned an empty reply")
            if error is not None or message is None:
                self.stats.failed += 1
                err = error or RuntimeError("no reply")
                out[glob] = (Candidate(**base, error=ErrorInfo.of(err)), False)
                continue
            self.stats.generated += 1
            self.store.put_candidate(
                prompt_id=item.id,
                model=handle.model_id,
                settings=handle.settings_hash,
                index=local,
                input_hash=item.input_hash,
                settings_json=handle.settings,
                message=message,
                latency_s=reply.latency_s,
                seed=seed,
            )
            candidate = Candidate(
                **base, message=message, text=message_text(message), usage=TokenUsage.of(message)
            )
            out[glob] = (candidate, False)
        return out


class RecordedModel(Runnable[LanguageModelInput, AIMessage]):
    """A deciding model (fusor, judge) that answers from the store's ``calls`` table when
    this exact call was made before, else calls the model and records the reply. Identical
    calls in flight at the same time are made once."""

    def __init__(
        self, handle: ModelHandle, store: CandidateStore, stats: JobStats, *, role: str
    ) -> None:
        self.handle = handle
        self.store = store
        self.stats = stats
        self.role = role
        self.model_name = handle.model_id
        self.name = f"{role}:{handle.name}"
        self._pending: dict[str, asyncio.Future[AIMessage]] = {}

    @property
    def InputType(self) -> Any:
        return LanguageModelInput

    @property
    def OutputType(self) -> type[AIMessage]:
        return AIMessage

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        messages = to_messages(input)
        key = call_key(self.handle.model_id, self.handle.settings_hash, messages, kwargs)
        hit = self.store.get_call(key)
        if hit is not None:
            self.stats.replayed_calls += 1
            return hit
        pending = self._pending.get(key)
        if pending is not None:
            self.stats.replayed_calls += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[AIMessage] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            reply = await self.handle.call(messages, stats=self.stats, config=config, **kwargs)
            if reply.error is not None or reply.value is None:
                raise reply.error or RuntimeError("no reply")
            self.store.put_call(
                key,
                model=self.handle.model_id,
                settings=self.handle.settings_hash,
                role=self.role,
                message=reply.value,
                latency_s=reply.latency_s,
            )
            self.stats.recorded_calls += 1
            future.set_result(reply.value)
            return reply.value
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody is warned
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._pending[key]

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return run_sync(lambda: self.ainvoke(input, config, **kwargs))
