"""The models of a batch job, through the candidate store (record and replay).

:class:`StoredModel` wraps a teacher's :class:`~fusion_graph.batch.models.ModelHandle` as
a chat model: each sample is read from the store when it is there (key: the prompt, the
model, its sampling settings and the sample's seed) and made by the handle only when it
is not, then recorded. :class:`Pool` runs :class:`~fusion_graph.nodes.fanout.FanOut`, the
fan-out of ``fusion_of_n``, over those models, so a pool makes the candidates
``fusion_of_n`` makes with the same models and seed: candidate ``i`` from teacher
``i % len(pool)`` with seed ``seed + i``, a batching teacher's samples in one call.
:class:`RecordedModel` records and replays the deciding models' calls (fusor, judges),
keyed by the exact call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import ensure_config, set_config_context
from pydantic import ConfigDict, SkipValidation

from fusion_graph.batch.data import (
    INPUT_HASH_KEY,
    PROMPT_ID_KEY,
    PromptItem,
    conversation_hash,
    prompt_config,
    prompt_messages,
)
from fusion_graph.batch.models import (
    Defaults,
    JobStats,
    ModelHandle,
    Reply,
    build_handle,
    build_pool,
    decider_spec,
)
from fusion_graph.batch.store import CandidateStore, StoreConflictError, call_key
from fusion_graph.messages import ChatContract, check_reply, to_messages
from fusion_graph.models import ModelSpec
from fusion_graph.nodes.fanout import FanOut
from fusion_graph.nodes.generator import Generator
from fusion_graph.nodes.verdicts import JUDGE_MAX_TOKENS, takes_json_schema
from fusion_graph.runtime import Caller, run_sync
from fusion_graph.types import Candidate

REPLAYED_KEY = "fusion_graph_replayed"
"""``response_metadata`` key set (True) on a reply read from the store."""
FUSOR_TEMPERATURE = 0.2
"""The fusor's temperature unless its spec sets one (judges: 0)."""


def is_replayed(message: AIMessage | None) -> bool:
    """Whether a reply was read from the store rather than made by this run."""
    return message is not None and bool(message.response_metadata.get(REPLAYED_KEY))


@dataclass(frozen=True)
class PromptKey:
    """Which prompt a call answers, in the store."""

    id: str
    input_hash: str


class StoredModel(ChatContract, RunnableSerializable[LanguageModelInput, AIMessage]):
    """A teacher as a chat model whose samples go through the store (see the module docs).

    A call's ``seed`` keys its sample; the prompt is the one named in the config metadata
    (:func:`~fusion_graph.batch.data.prompt_config`), else the conversation itself. A
    replayed reply has ``response_metadata[REPLAYED_KEY] = True`` (and the stored
    ``latency_s``); a new one is recorded once it is known to be a reply
    (:func:`~fusion_graph.messages.check_reply`).
    Build it with :meth:`of`, which picks :class:`StoredSamplingModel` for a handle that
    batches (so the fan-out hands it a prompt's samples in one call).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    handle: SkipValidation[ModelHandle]
    store: SkipValidation[CandidateStore]
    stats: SkipValidation[JobStats]
    seed: int | None = None
    """The seed of a call that names none (the fan-out gives each candidate its own)."""
    model_name: str = ""
    """The teacher's name: recorded as ``Candidate.model``."""

    @classmethod
    def of(cls, handle: ModelHandle, store: CandidateStore, stats: JobStats) -> StoredModel:
        """The stored model of ``handle`` (a :class:`StoredSamplingModel` if it batches)."""
        kind = StoredSamplingModel if handle.batched is not None else StoredModel
        return kind(
            handle=handle, store=store, stats=stats, seed=handle.seed, model_name=handle.name
        )

    def _seed(self, seed: int | None) -> int:
        if seed is not None:
            return seed
        return self.seed if self.seed is not None else self.handle.seed

    def _prompt(self, messages: Sequence[BaseMessage], config: RunnableConfig | None) -> PromptKey:
        metadata = ensure_config(config).get("metadata") or {}
        digest = str(metadata.get(INPUT_HASH_KEY) or conversation_hash(messages))
        return PromptKey(id=str(metadata.get(PROMPT_ID_KEY) or digest), input_hash=digest)

    def _replay(self, prompt: PromptKey, seeds: Sequence[int]) -> dict[int, AIMessage]:
        """The stored samples among ``seeds``, marked as replayed.

        Raises:
            StoreConflictError: the prompt id is stored for another prompt text.
        """
        stored = self.store.get_candidates(
            prompt_id=prompt.id,
            model=self.handle.model_id,
            settings=self.handle.settings_hash,
            indices=seeds,
            input_hash=prompt.input_hash,
        )
        replies: dict[int, AIMessage] = {}
        for seed, hit in stored.items():
            self.stats.replayed += 1
            metadata = {**hit.message.response_metadata, REPLAYED_KEY: True}
            metadata["latency_s"] = hit.latency_s
            replies[seed] = hit.message.model_copy(update={"response_metadata": metadata})
        return replies

    def _record(self, prompt: PromptKey, seed: int, result: Reply) -> AIMessage | Exception:
        """A new sample: recorded when it is a reply, else its error (never raises)."""
        error: Exception | None = result.error
        message = result.value
        if error is None and message is not None:
            try:
                message = check_reply(message)
            except ValueError as exc:
                error = exc
        if error is not None or message is None:
            self.stats.failed += 1
            return error or RuntimeError("no reply")
        self.stats.generated += 1
        self.store.put_candidate(
            prompt_id=prompt.id,
            model=self.handle.model_id,
            settings=self.handle.settings_hash,
            index=seed,
            input_hash=prompt.input_hash,
            settings_json=self.handle.settings,
            message=message,
            latency_s=float(message.response_metadata.get("latency_s", result.latency_s)),
            seed=seed,
        )
        return message

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        messages = to_messages(input)
        seed = self._seed(kwargs.pop("seed", None))
        prompt = self._prompt(messages, config)
        replayed = self._replay(prompt, [seed])
        if seed in replayed:
            return replayed[seed]
        result = await self.handle.call(
            messages, stats=self.stats, seed=seed, config=config, **kwargs
        )
        reply = self._record(prompt, seed, result)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return run_sync(lambda: self.ainvoke(input, config, **kwargs))


class StoredSamplingModel(StoredModel):
    """A :class:`StoredModel` of a handle that batches: the missing samples of a prompt
    are made in one call (:class:`~fusion_graph.nodes.fanout.SupportsSampleN`). The prompt
    is the one in the context's config metadata."""

    async def asample_n(
        self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        conversation = to_messages(list(messages))
        wanted = [self._seed(s) for s in seeds]
        prompt = self._prompt(conversation, None)
        replayed = self._replay(prompt, wanted)
        missing = [s for s in dict.fromkeys(wanted) if s not in replayed]
        made: dict[int, AIMessage | Exception] = {}
        if missing:
            results = await self.handle.sample(conversation, missing, stats=self.stats, **kwargs)
            for seed, result in zip(missing, results, strict=True):
                made[seed] = self._record(prompt, seed, result)
        return [replayed[s] if s in replayed else made[s] for s in wanted]

    def sample_n(
        self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        return run_sync(lambda: self.asample_n(messages, seeds=seeds, **kwargs))


@dataclass(frozen=True, kw_only=True)
class CandidateSet:
    """The candidates of one prompt, index order, failures included."""

    candidates: list[Candidate]
    replayed: frozenset[int]
    """Indices read from the store."""
    teachers: list[str]
    """The teacher (handle name) of each index."""


class Pool:
    """Makes candidates for prompts with the fan-out of ``fusion_of_n`` over the teachers'
    :class:`StoredModel` s: candidate ``i`` comes from ``handles[i % len]`` with seed
    ``seed + i``, read from the store when it is there, else generated and recorded."""

    def __init__(
        self,
        handles: Sequence[ModelHandle],
        store: CandidateStore,
        stats: JobStats,
        *,
        seed: int = 0,
        grace: float | None = None,
    ) -> None:
        if not handles:
            msg = "the pool needs at least one model"
            raise ValueError(msg)
        self.handles = list(handles)
        self.store = store
        self.stats = stats
        self.seed = seed
        """Base seed: candidate ``i`` gets ``seed + i``."""
        self.grace = grace
        """Straggler cut-off: once one candidate succeeded, wait at most this many seconds
        for the others, then cancel them (:attr:`FanOut.grace`). A cut candidate is not
        recorded in the store: a later job over the store asks its teacher again (a synth
        row is written without it, so rerunning that synth does not)."""
        self.models = [StoredModel.of(h, store, stats) for h in self.handles]
        self.generators = tuple(Generator.of(m) for m in self.models)

    def fan_out(self, n: int) -> FanOut:
        """The fan-out of ``n`` candidates."""
        return FanOut(generators=self.generators, n=n, seed=self.seed, grace=self.grace)

    async def candidates(self, item: PromptItem, n: int) -> CandidateSet:
        """The first ``n`` candidates of ``item``.

        Raises:
            StoreConflictError: the prompt id is stored for another prompt text.
        """
        fan_out = self.fan_out(n)
        messages = prompt_messages(item)
        config = prompt_config(item, run_name=f"candidates[{item.id}]")
        # The context carries the config to the models' multi-sample calls too.
        with set_config_context(config) as context:
            run = fan_out.generate(messages, messages, config, caller=Caller(sync=False))
            made = await asyncio.create_task(run, context=context)
        for generated in made:
            if isinstance(generated.exception, StoreConflictError):
                raise generated.exception
        candidates = [_with_stored_latency(g.candidate) for g in made]
        return CandidateSet(
            candidates=candidates,
            replayed=frozenset(c.index for c in candidates if is_replayed(c.message)),
            teachers=[fan_out.generator(i).name for i in range(n)],
        )


def _with_stored_latency(candidate: Candidate) -> Candidate:
    """A replayed candidate takes the latency it was made in."""
    if candidate.message is None or not is_replayed(candidate.message):
        return candidate
    latency = float(candidate.message.response_metadata.get("latency_s", candidate.latency_s))
    return candidate.model_copy(update={"latency_s": latency})


class RecordedModel(ChatContract, Runnable[LanguageModelInput, AIMessage]):
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
    def takes_json_schema(self) -> bool:
        """Whether every replica enforces a ``response_format`` JSON schema."""
        return all(takes_json_schema(r.model) for r in self.handle.replicas)

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


class JobModels:
    """Every model of one job over one store: the teachers' :class:`Pool` and the deciding
    models (fusor, judges) as :class:`RecordedModel` s, all under one set of per-endpoint
    bounds. A decider is its own spec, else the first teacher's model.

    Raises:
        ValueError / ImportError / FileNotFoundError: a model cannot be built (see
            :func:`~fusion_graph.batch.models.build_pool`).
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        defaults: Defaults,
        store: CandidateStore,
        stats: JobStats | None = None,
    ) -> None:
        if not specs:
            msg = "a job needs at least one teacher model"
            raise ValueError(msg)
        self.specs = list(specs)
        self.defaults = defaults
        self.store = store
        self.stats = stats or JobStats()
        handles = build_pool(self.specs, defaults)
        self.pool = Pool(handles, store, self.stats, seed=defaults.seed, grace=defaults.grace)

    def decider(
        self, text: str | None, *, role: str, temperature: float, max_tokens: int | None = None
    ) -> RecordedModel:
        """The recorded model of ``text`` (a spec; ``None``: the first teacher's model)."""
        spec = decider_spec(text, self.specs[0], temperature=temperature, max_tokens=max_tokens)
        handle = build_handle(spec, self.defaults)
        return RecordedModel(handle, self.store, self.stats, role=role)

    def fusor(self, text: str | None = None) -> RecordedModel:
        """The fusor (temperature :data:`FUSOR_TEMPERATURE` unless its spec says)."""
        return self.decider(text, role="fusor", temperature=FUSOR_TEMPERATURE)

    def judge(self, text: str | None = None, *, role: str = "judge") -> RecordedModel:
        """A judge (temperature 0, :data:`JUDGE_MAX_TOKENS`, unless its spec says)."""
        return self.decider(text, role=role, temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
