"""Fan-out: N candidates in parallel, each optionally critiqued as soon as it is ready.

Candidate ``i`` comes from generator ``i % len(pool)`` with seed ``seed + i``. Every
candidate is an independent task with its own retries, timeout, seed and result; a
failure is recorded on the candidate, never raised. Candidates that one multi-sample model
(:class:`SupportsSampleN`: the embedded llama.cpp model, vLLM, an OpenAI-compatible server
with ``n``) can make together are made in one call. A candidate's critique starts when that
candidate finishes, so a slow candidate never holds back the others' critiques.

:class:`FanOut` is public: the wrappers, the subgraph and the batch jobs all make their
candidates with it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import set_config_context

from fusion_graph import events
from fusion_graph.budget import BudgetSpentError
from fusion_graph.durable import Journal
from fusion_graph.errors import NotEnoughCandidatesError
from fusion_graph.events import EventSink
from fusion_graph.hooks import CallInfo, current_hooks
from fusion_graph.messages import message_text
from fusion_graph.nodes.critique import critique
from fusion_graph.nodes.generator import Generator
from fusion_graph.prompts import CRITIQUE_PROMPT, PromptTemplate
from fusion_graph.runtime import Caller, CallResult, role_config
from fusion_graph.types import Candidate, ErrorInfo, StopCause, TokenUsage

MAX_CANDIDATES = 256
"""The largest ``n`` accepted. Beyond it, prompts for the fusor or judge outgrow any
context window, and the fan-out is better split into several runs."""


class EarlyStopping(Protocol):
    """When to stop sampling (e.g. :class:`~fusion_graph.MajorityVote` with ``early_stop``)."""

    @property
    def round_size(self) -> int:
        """Candidates made per round (the rule is asked between rounds)."""
        ...

    def reason_to_stop(self, candidates: Sequence[Candidate]) -> str | None:
        """Why no more candidates are needed, given the successful ones so far (index
        order), or ``None`` to go on."""
        ...


@dataclass(frozen=True, kw_only=True)
class Generated:
    """A candidate plus what is not state: the node's full update."""

    candidate: Candidate
    update: dict[str, Any] | None = None

    @property
    def exception(self) -> Exception | None:
        """The candidate's original exception (see :attr:`Candidate.exception`)."""
        return self.candidate.exception

    def to_plain(self) -> dict[str, Any]:
        """Checkpoint-safe data: the candidate (see :meth:`Candidate.to_plain`) and the
        update (the node's own state values)."""
        return {"candidate": self.candidate.to_plain(), "update": self.update}

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> Generated:
        """What :meth:`to_plain` saved (the exception object is not saved)."""
        return cls(candidate=Candidate.from_plain(data["candidate"]), update=data["update"])


@dataclass(frozen=True, kw_only=True)
class FanOut:
    """Makes the N candidates of a run (see the module docs).

    Example::

        fan_out = FanOut(generators=generator_pool(llm), n=4, seed=0)
        caller = Caller.for_run(sync=False)
        made = await fan_out.generate("Hi", to_messages("Hi"), {}, caller=caller)
        [g.candidate.text for g in made]
    """

    generators: tuple[Generator, ...]
    """The pool: candidate ``i`` comes from ``generators[i % len]``."""
    n: int
    """How many candidates."""
    seed: int | None = None
    """Base seed: candidate ``i`` gets ``seed + i``; ``None`` draws a base per run."""
    temperature: float | None = None
    """Sampling temperature for generators that take one."""
    critic: Runnable[Any, Any] | None = None
    """Critiques each successful candidate when set."""
    critique_prompt: PromptTemplate = CRITIQUE_PROMPT
    """The critic's prompt."""
    quorum: int = 1
    """Successful candidates after which the grace window starts (``min_candidates``)."""
    grace: float | None = None
    """Seconds to wait for the other candidates once ``quorum`` succeeded; those still
    running then are cancelled. ``None`` waits for all."""
    early_stop: EarlyStopping | None = None
    """Makes candidates in rounds and stops when the rule says the vote is settled."""

    @property
    def is_node(self) -> bool:
        return self.generators[0].is_node

    def generator(self, index: int) -> Generator:
        """The generator of candidate ``index``."""
        return self.generators[index % len(self.generators)]

    def seeds(self, restored: dict[int, Generated] | None = None) -> list[int]:
        """The seed of each candidate of one run: ``seed + i``, with a fresh base when
        ``seed`` is None (the base of the restored candidates on a resume)."""
        base = self.seed
        for generated in (restored or {}).values():
            if base is None and generated.candidate.seed is not None:
                base = generated.candidate.seed - generated.candidate.index
        if base is None:
            base = random.randrange(2**31 - MAX_CANDIDATES)
        return [base + i for i in range(self.n)]

    def groups(self, indices: Sequence[int]) -> tuple[dict[int, list[int]], list[int]]:
        """Of ``indices``, the candidates that one multi-sample call can make together (by
        pool slot), and the rest (one call each)."""
        groups: dict[int, list[int]] = {}
        single: list[int] = []
        for index in indices:
            slot = index % len(self.generators)
            if self.generators[slot].samples_n:
                groups.setdefault(slot, []).append(index)
            else:
                single.append(index)
        for slot, indices in list(groups.items()):
            if len(indices) < 2:
                single.extend(groups.pop(slot))
        return groups, sorted(single)

    async def generate(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        *,
        caller: Caller,
        emit: EventSink | None = None,
        save_last: bool = True,
    ) -> list[Generated]:
        """Every candidate (and its critique), concurrently; index order; failures recorded,
        never raised. ``source`` is what each generator is called with (the input, or the
        state for a node); ``conversation`` is what critics and deciders are shown.

        With ``grace``, candidates still running ``grace`` seconds after the ``quorum``-th
        success are cancelled; with ``early_stop``, candidates are made in rounds and the
        rest are not started once the rule says the vote is settled. Either way every
        candidate is returned, the stopped ones as cancelled (:attr:`Candidate.stopped`).

        In a node of a checkpointed graph, finished candidates are saved as they finish and
        a resumed run makes only the others (:mod:`fusion_graph.durable`). ``save_last=False``
        when the node returns the candidates at once (LangGraph then saves them itself): the
        last ones to finish are not saved separately, and nothing is waited for."""
        sink = emit or events.event_sink()
        journal = Journal.of(config, sync=caller.sync)
        restored = await _restored(journal)
        for generated in restored.values():
            sink(events.candidate_finished(generated.candidate))
        if caller.budget is not None:  # what the earlier attempt spent counts too
            caller.budget.charge_made(g.candidate for g in restored.values())
        run = _Run(self, source, conversation, config, caller, sink, self.seeds(restored))
        made = list(restored.values())
        rounds = self._rounds([i for i in range(self.n) if i not in restored])
        for number, indices in enumerate(rounds):
            why = self._settled(made)
            if why is not None:
                rest = [i for later in rounds[number:] for i in later]
                made.extend(run.cancelled(i, "early_stop", why) for i in rest)
                break
            last = number == len(rounds) - 1
            needed = self.quorum - sum(g.candidate.ok for g in made)  # for the grace window
            made.extend(
                await self._round(run, indices, journal, needed, save_last=save_last or not last)
            )
        return sorted(made, key=lambda g: g.candidate.index)

    def _rounds(self, todo: list[int]) -> list[list[int]]:
        """The candidates to make, all at once, or in rounds for an early-stopping vote."""
        if self.early_stop is None or not todo:
            return [todo] if todo else []
        size = self.early_stop.round_size
        return [todo[k : k + size] for k in range(0, len(todo), size)]

    def _settled(self, made: list[Generated]) -> str | None:
        """Why the early-stopping rule says no more candidates are needed, if it does."""
        if self.early_stop is None:
            return None
        ordered = sorted((g.candidate for g in made), key=lambda c: c.index)
        ok = [c for c in ordered if c.ok]
        if not ok or len(ok) < self.quorum:  # min_candidates first, then the rule
            return None
        return self.early_stop.reason_to_stop(ok)

    async def _round(
        self,
        run: _Run,
        indices: list[int],
        journal: Journal | None,
        needed: int,
        *,
        save_last: bool,
    ) -> list[Generated]:
        """Make ``indices`` concurrently (saving each as it finishes), then the grace cut."""
        work = self._work(run, indices)
        unsaved = len(work)

        async def saved(unit: list[int], making: Awaitable[list[Generated]]) -> list[Generated]:
            nonlocal unsaved
            try:
                made = await making
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if run.cut is None or task not in run.cut_tasks or task.cancelling() > 1:
                    raise  # the run itself was cancelled (Ctrl-C, a cancelled task)
                task.uncancel()  # we cut it on purpose: it ends with data
                made = [run.cut_short(i, run.cut) for i in unit]
            unsaved -= 1
            if journal is not None and (save_last or unsaved):
                journal.add([g.to_plain() for g in made])
            return made

        tasks = [asyncio.ensure_future(saved(unit, making)) for unit, making in work]
        try:
            if self.grace is None:
                done = await asyncio.gather(*tasks)
            else:
                done = await self._with_grace(run, tasks, needed)
            if journal is not None and save_last:
                await journal.flush()  # what follows in the node must not cost a candidate
            elif journal is not None:
                journal.discard()  # the node returns them all now
        except BaseException as exc:
            # Only control flow gets here (an interrupt(), a Command for the parent graph,
            # Ctrl-C, a cancelled run): failures are data. Stop the siblings too, and keep
            # what finished for a resume.
            for task in tasks:
                task.cancel()
            if journal is not None:
                await _keep(journal, exc)
            raise
        return [g for item in done for g in item]

    async def _with_grace(
        self, run: _Run, tasks: Sequence[asyncio.Future[list[Generated]]], needed: int
    ) -> list[list[Generated]]:
        """Wait for ``needed`` more successes, then at most ``grace`` seconds for the rest,
        and cancel what is still running (their calls are cancelled: HTTP requests closed,
        the embedded model stopped between tokens). "Running" is as the fan-out sees it: a
        reply still on its way up through the model client's callbacks is cut too. Control
        flow raised by a candidate (an ``interrupt()``) ends the wait at once."""
        assert self.grace is not None
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[list[Generated]]] = set(tasks)
        while pending and needed > 0:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            needed -= sum(g.candidate.ok for task in finished for g in task.result())
        deadline = loop.time() + self.grace
        while pending and (left := deadline - loop.time()) > 0:
            finished, pending = await asyncio.wait(
                pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            for task in finished:
                task.result()  # raises control flow now, not when the window ends
        if pending:
            run.cut = (
                f"still running {self.grace:g} s after {self.quorum} candidate(s) had "
                "succeeded (the grace window)"
            )
            run.cut_tasks = set(pending)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
        return [task.result() for task in tasks]

    def _work(
        self, run: _Run, indices: list[int]
    ) -> list[tuple[list[int], Awaitable[list[Generated]]]]:
        """One awaitable per call to make (a single candidate, or a multi-sample group),
        with the candidates it makes."""
        groups, single = self.groups(indices)
        work: list[tuple[list[int], Awaitable[list[Generated]]]] = []
        for unit in [[i] for i in single] + list(groups.values()):
            if len(unit) == 1:
                work.append((unit, run.one(unit[0])))
            else:
                work.append((unit, run.group(self.generator(unit[0]), unit)))
        return work


async def _restored(journal: Journal | None) -> dict[int, Generated]:
    """The candidates an earlier attempt of this node finished, by index."""
    if journal is None:
        return {}
    made = (Generated.from_plain(record) for record in await journal.read())
    return {g.candidate.index: g for g in made}


async def _keep(journal: Journal, exc: BaseException) -> None:
    """Save what finished before ``exc`` ends the fan-out (not when it is cancelled)."""
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        journal.discard()
        return
    try:
        await journal.flush()
    except BaseException:
        journal.discard()


@dataclass
class _Run:
    """One run of a :class:`FanOut`."""

    fan_out: FanOut
    source: Any
    conversation: Sequence[BaseMessage]
    config: RunnableConfig
    caller: Caller
    emit: EventSink
    seeds: list[int]
    cut: str | None = None
    """Set (to the reason) when the grace window cancels the candidates still running."""
    cut_tasks: set[asyncio.Future[list[Generated]]] = field(default_factory=set)
    """The tasks the grace window cancelled (any other cancellation is the run's own)."""
    finished: dict[int, Generated] = field(default_factory=dict)
    """Candidates made so far (before their critiques), by index."""

    def cut_short(self, index: int, why: str) -> Generated:
        """Candidate ``index`` when the grace window cut it: the candidate itself if it was
        made (its critique was running), else a cancelled one."""
        made = self.finished.get(index)
        if made is None:
            return self.cancelled(index, "grace", why, attempts=1)
        self.emit(events.candidate_finished(made.candidate))
        return made

    started: float = field(default_factory=time.perf_counter)

    def cancelled(self, index: int, cause: StopCause, why: str, *, attempts: int = 0) -> Generated:
        """A candidate the run stopped (``attempts=1``) or did not start."""
        candidate = Candidate.cancelled(
            index=index,
            model=self.fan_out.generator(index).name,
            seed=self.seeds[index],
            cause=cause,
            why=why,
            attempts=attempts,
            latency_s=time.perf_counter() - self.started if attempts else 0.0,
        )
        self.emit(events.candidate_finished(candidate))
        return Generated(candidate=candidate)

    def _info(self, index: int, generator: Generator) -> CallInfo:
        temperature = self.fan_out.temperature
        if temperature is None or not generator.takes_temperature:
            temperature = generator.model_temperature
        seed = self.seeds[index]
        return CallInfo(index=index, model=generator.name, seed=seed, temperature=temperature)

    async def one(self, index: int) -> list[Generated]:
        generator = self.fan_out.generator(index)
        seed = self.seeds[index]
        self.emit(events.candidate_started(index, generator.name))
        child = role_config(
            self.config, role="generator", run_name=f"candidate[{index}]", index=index
        )
        with current_hooks().candidate(self._info(index, generator)) as done:
            result = await generator.make(
                self.source, child, self.caller, seed=seed, temperature=self.fan_out.temperature
            )
            made = _generated(generator, index, seed, result)
            done(made.candidate)
        self.finished[index] = made
        return [await self._critiqued(made)]

    async def group(self, generator: Generator, indices: list[int]) -> list[Generated]:
        model = generator.target
        seeds = [self.seeds[i] for i in indices]
        temperature = self.fan_out.temperature
        kwargs: dict[str, Any] = {"temperature": temperature} if temperature is not None else {}
        if self.caller.timeout is not None and generator.takes_timeout:
            kwargs["timeout"] = self.caller.timeout  # the requests end with the attempt
        messages = list(self.conversation)
        with ExitStack() as stack:
            done = []
            for index in indices:
                self.emit(events.candidate_started(index, generator.name))
                info = self._info(index, generator)
                done.append(stack.enter_context(current_hooks().candidate(info)))
            # The call sees the group's config through the context (callbacks, tags,
            # metadata), as a node does: sample_n takes no config argument.
            child = role_config(
                self.config,
                role="generator",
                run_name=f"candidates[{','.join(map(str, indices))}]",
            )

            def sample() -> list[AIMessage | Exception]:
                with set_config_context(child) as ctx:
                    return ctx.run(model.sample_n, messages, seeds=seeds, **kwargs)

            async def asample() -> list[AIMessage | Exception]:
                with set_config_context(child) as ctx:
                    task = asyncio.create_task(
                        model.asample_n(messages, seeds=seeds, **kwargs), context=ctx
                    )
                    return await task  # type: ignore[no-any-return]

            result: CallResult[list[AIMessage | Exception]] = await self.caller.call(
                sample, asample, model=model
            )
            if result.error is not None:
                # One failed request must not cost every candidate: make them one by one.
                made = await self._one_by_one(generator, indices, result)
            else:
                made = [
                    _generated(generator, index, seed, _sample(result, k))
                    for k, (index, seed) in enumerate(zip(indices, seeds, strict=True))
                ]
                made = list(await asyncio.gather(*(self._retried(generator, m) for m in made)))
            for k, generated in enumerate(made):
                done[k](generated.candidate)
                self.finished[generated.candidate.index] = generated
        return list(await asyncio.gather(*(self._critiqued(m) for m in made)))

    async def _retried(self, generator: Generator, made: Generated) -> Generated:
        """A sample that failed inside a successful multi-sample call (e.g. one fill-in
        request to a server that ignores ``n``) is retried alone under the run's retry
        policy, after its wait (backoff, or the server's Retry-After)."""
        error = made.exception
        wait = None if error is None else self.caller.retry_wait(error)
        if wait is None:
            return made
        await asyncio.sleep(wait)
        index = made.candidate.index
        child = role_config(
            self.config, role="generator", run_name=f"candidate[{index}]", index=index
        )
        alone = await generator.make(
            self.conversation,
            child,
            self.caller.after_one_attempt(),
            seed=self.seeds[index],
            temperature=self.fan_out.temperature,
        )
        first = made.candidate
        total = CallResult(
            alone.value,
            alone.error,
            first.attempts + alone.attempts,
            first.latency_s + alone.latency_s + wait,
        )
        return _generated(generator, index, self.seeds[index], total)

    async def _one_by_one(
        self, generator: Generator, indices: list[int], failed: CallResult[Any]
    ) -> list[Generated]:
        """The candidates of a failed multi-sample call, each made by a call of its own;
        each records the group's error (``multi_sample_error``), attempts and time."""
        assert failed.error is not None
        group_error = ErrorInfo.of(failed.error)

        async def one(index: int) -> Generated:
            child = role_config(
                self.config, role="generator", run_name=f"candidate[{index}]", index=index
            )
            seed = self.seeds[index]
            alone = await generator.make(
                self.conversation,
                child,
                self.caller,
                seed=seed,
                temperature=self.fan_out.temperature,
            )
            total = CallResult(
                alone.value,
                alone.error,
                failed.attempts + alone.attempts,
                failed.latency_s + alone.latency_s,
            )
            made = _generated(generator, index, seed, total)
            update = {"multi_sample_error": group_error}
            return Generated(candidate=made.candidate.model_copy(update=update), update=made.update)

        return list(await asyncio.gather(*(one(i) for i in indices)))

    async def _critiqued(self, made: Generated) -> Generated:
        critic = self.fan_out.critic
        if critic is not None and made.candidate.ok:
            notes = await critique(
                critic,
                self.fan_out.critique_prompt,
                self.conversation,
                made.candidate,
                self.config,
                self.caller,
            )
            made = Generated(
                candidate=made.candidate.model_copy(update={"critiques": [notes]}),
                update=made.update,
            )
        self.emit(events.candidate_finished(made.candidate))
        return made


def _sample(result: CallResult[list[AIMessage | Exception]], k: int) -> CallResult[Any]:
    """Sample ``k`` of a multi-sample call as a call result of its own."""
    if result.error is not None or result.value is None:
        error = result.error or RuntimeError("the multi-sample call returned nothing")
        return CallResult(None, error, result.attempts, result.latency_s)
    value = result.value[k]
    if isinstance(value, Exception):
        return CallResult(None, value, result.attempts, result.latency_s)
    # A backend may say when each sample finished.
    latency = float(value.response_metadata.get("latency_s", result.latency_s))
    return CallResult(value, None, result.attempts, latency)


def _generated(
    generator: Generator, index: int, seed: int | None, result: CallResult[Any]
) -> Generated:
    base = {
        "index": index,
        "model": generator.name,
        "latency_s": result.latency_s,
        "attempts": result.attempts,
        "seed": seed,
    }
    error = result.error
    if error is None:
        try:
            message, update = generator.reply(result.value)
        except (TypeError, ValueError) as exc:
            error = exc
        else:
            candidate = Candidate(
                **base, message=message, text=message_text(message), usage=TokenUsage.of(message)
            )
            return Generated(candidate=candidate, update=update)
    if isinstance(error, BudgetSpentError):
        candidate = Candidate(**base, error=ErrorInfo.of(error), stopped="budget")
    else:
        candidate = Candidate(**base, error=ErrorInfo.of(error)).with_exception(error)
    return Generated(candidate=candidate)


def check_quorum(candidates: Sequence[Candidate], min_candidates: int) -> None:
    """Raise :class:`NotEnoughCandidatesError` when fewer than ``min_candidates``
    succeeded; its ``exceptions`` are the original errors where this process made the
    candidate (:attr:`Candidate.exception`), else rebuilt from the recorded
    :class:`ErrorInfo`."""
    ok = sum(c.ok for c in candidates)
    if ok >= min_candidates:
        return
    errors: list[Exception] = []
    for candidate in candidates:
        if candidate.ok:
            continue
        exc = candidate.exception
        if exc is None:
            detail = str(candidate.error) if candidate.error else "no reply"
            exc = RuntimeError(f"candidate {candidate.index} ({candidate.model}) failed: {detail}")
        errors.append(exc)
    msg = (
        f"{ok} of {len(candidates)} candidates succeeded, fewer than "
        f"min_candidates={min_candidates}"
    )
    raise NotEnoughCandidatesError(msg, errors, candidates=candidates, required=min_candidates)
