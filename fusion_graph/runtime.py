"""How one run calls models and functions: retries, timeouts, a concurrency bound, and
the bridge between the sync and async APIs.

There is one orchestration, written with asyncio. The async API runs it on the caller's
event loop and calls models with ``ainvoke``. The sync API runs the same coroutine on a
background event loop and calls models with ``invoke`` on a thread pool of our own, sized for
the fan-out (the default pools hold ``cpu_count + 4`` threads: six on a 2-core machine, too
few for N=8 parallel candidates).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langgraph.constants import TAG_NOSTREAM
from langgraph.errors import GraphBubbleUp
from langgraph.types import RetryPolicy
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_none,
    wait_random,
)

from fusion_graph.budget import Budget, BudgetSpentError

T = TypeVar("T")


class _ThreadPool(concurrent.futures.Executor):
    """A ``ThreadPoolExecutor`` made on first use, and made afresh in a forked child (which
    has the parent's pool but none of its threads: work handed to it would never run)."""

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock, self._pool = threading.Lock(), None

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="fusion-graph"
                )
            pool = self._pool
        return pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait, cancel_futures=cancel_futures)


THREAD_POOL: concurrent.futures.Executor = _ThreadPool(max_workers=512)
"""The one thread pool of fusion-graph: blocking model calls of every sync run (and the
extra requests of an n-ignoring OpenAI-compatible backend) run here. Threads are made
lazily and reused, so a run of N candidates does not pay for N thread starts; large,
because blocked model calls hold threads."""


class _Portal:
    """One event loop on a daemon thread, started on first use, that runs the coroutines
    of every sync call. Cheaper than ``asyncio.run`` per call, which measurably delays
    returning after a wide fan-out (about 50 ms at N=64, see benchmarks/README.md). A
    forked child starts its own (it has the parent's loop but not the thread running it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forget)
        atexit.register(self.close)

    def _forget(self) -> None:
        self._lock, self._loop, self._thread = threading.Lock(), None, None

    def close(self, timeout_s: float = 5.0) -> None:
        """Shut the loop down as ``asyncio.run`` would (at exit): its async generators are
        closed first, so what was made on it closes its connections (the HTTP sessions and
        clients of :mod:`fusion_graph.integrations.loop_clients`) instead of being found
        unclosed when the interpreter ends."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or not thread.is_alive() or loop.is_closed():
            return
        shutdown = asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop)
        with contextlib.suppress(Exception):  # best effort: the process is ending
            shutdown.result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="fusion-graph-loop", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def on_loop_thread(self) -> bool:
        return self._thread is threading.current_thread()


_PORTAL = _Portal()


class _StopFlag:
    """Set when the attempt it belongs to was cancelled or timed out (one bool: cheaper
    than an Event per call, and reading it needs no lock)."""

    __slots__ = ("requested",)

    def __init__(self) -> None:
        self.requested = False


_STOP: contextvars.ContextVar[_StopFlag | None] = contextvars.ContextVar(
    "fusion_graph_call_stop", default=None
)


class CallStopped(Exception):
    """Raised by a blocking backend that stopped because :func:`stop_requested` said so."""


def stop_requested() -> bool:
    """True when the call this code runs in was cancelled (Ctrl-C, a straggler cut) or timed
    out. Blocking backends (the embedded llama.cpp model) check it between tokens and stop
    with :class:`CallStopped`, so a timeout or Ctrl-C frees the model within a token instead
    of after the whole generation. HTTP calls on a worker thread cannot be stopped this way:
    their result is discarded when they end."""
    flag = _STOP.get()
    return flag is not None and flag.requested


class CallAborted(Exception):
    """A ``KeyboardInterrupt`` or ``SystemExit`` raised inside a call on a worker thread,
    carried as an ``Exception`` so that it cannot stop the shared event loop. It ends the
    whole run (it is never a failed candidate), and :func:`run_sync` (or
    :func:`reraise_aborted` on the async path) raises the original again."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__} inside a model call")
        self.original = original


def _guarded(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit) as exc:
        raise CallAborted(exc) from exc


async def reraise_aborted(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` (async API), raising a :class:`CallAborted` as its original."""
    try:
        return await awaitable
    except CallAborted as exc:
        raise exc.original from None


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, with the caller's context.

    The coroutine runs on a shared background event loop; the calling thread waits. (A
    sync call made from a coroutine already on that loop runs on a loop of its own in a
    helper thread instead, so it cannot block the loop it waits for.) When the wait is
    interrupted (Ctrl-C), the coroutine is cancelled and the interruption raised once it
    has ended, so it leaves nothing running or queued behind (interrupt again to stop
    waiting for that).
    """
    ctx = contextvars.copy_context()
    if _PORTAL.on_loop_thread():
        try:
            return THREAD_POOL.submit(ctx.run, asyncio.run, make()).result()
        except CallAborted as exc:
            raise exc.original from None
    loop = _PORTAL.loop()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()
    ended = threading.Event()

    def start() -> None:
        if done.cancelled():
            ended.set()
            return
        task = loop.create_task(make(), context=ctx)
        task.add_done_callback(lambda t: _settle(t, done, ended))
        # Cancelled by the caller's thread: the task is cancelled on its own loop's.
        done.add_done_callback(
            lambda _: loop.call_soon_threadsafe(task.cancel) if done.cancelled() else None
        )

    loop.call_soon_threadsafe(start)
    try:
        return done.result()
    except CallAborted as exc:
        raise exc.original from None
    except BaseException:
        # e.g. KeyboardInterrupt in the caller: stop the run as well, on its own loop
        if done.cancel():
            ended.wait()
        raise


def _settle(
    task: asyncio.Task[T], done: concurrent.futures.Future[T], ended: threading.Event
) -> None:
    ended.set()
    if done.cancelled():
        return
    if task.cancelled():
        done.cancel()
    elif (exc := task.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


def _retry_predicate(policy: RetryPolicy) -> Callable[[BaseException], bool]:
    retry_on = policy.retry_on

    def predicate(exc: BaseException) -> bool:
        if not isinstance(exc, Exception) or isinstance(
            exc, CallAborted | GraphBubbleUp | BudgetSpentError
        ):
            return False
        if isinstance(exc, TimeoutError):  # our own per-attempt timeout: always retryable
            return True
        if isinstance(retry_on, type):
            return isinstance(exc, retry_on)
        if isinstance(retry_on, Sequence):
            return isinstance(exc, tuple(retry_on))
        return bool(retry_on(exc))

    return predicate


def retry_after_s(error: BaseException | None) -> float | None:
    """How long the server asked to wait before a retry, in seconds: the ``retry-after-ms``
    or ``Retry-After`` (seconds or an HTTP date) header of the error's HTTP response
    (``openai.APIStatusError``, ``httpx.HTTPStatusError``, ...); None when it says nothing."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = parsedate_to_datetime(value)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError, OverflowError):
        return None


@dataclass(frozen=True, slots=True)
class CallResult(Generic[T]):
    """The outcome of one call with its retries: a value or the last error."""

    value: T | None
    error: Exception | None
    attempts: int
    latency_s: float


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Calls models and functions for one run."""

    sync: bool
    """Sync API: prefer ``invoke`` on our thread pool (but see :func:`does_io_on_event_loop`).
    Async API: prefer ``ainvoke``."""
    timeout: float | None = None
    """Per-attempt timeout in seconds."""
    retry: RetryPolicy | None = None
    """Retries with backoff (run with tenacity); ``None`` makes a single attempt."""
    semaphore: asyncio.Semaphore | None = None
    """Bounds calls in flight; held per attempt, not while backing off."""
    budget: Budget | None = None
    """The run's token budget: asked before each attempt, charged after it."""

    @classmethod
    def for_run(
        cls,
        *,
        sync: bool,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        max_concurrency: int | None = None,
        budget: Budget | None = None,
    ) -> Caller:
        """The caller of one run (its bound and budget are fresh: runs do not share them)."""
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        return cls(sync=sync, timeout=timeout, retry=retry, semaphore=semaphore, budget=budget)

    async def call_model(
        self, model: Runnable[Any, Any], input: Any, config: RunnableConfig, **kwargs: Any
    ) -> CallResult[Any]:
        """``model.invoke`` (sync API) or ``model.ainvoke`` (async API), with the policy."""
        return await self.call(
            lambda: model.invoke(input, config, **kwargs),
            lambda: model.ainvoke(input, config, **kwargs),
            model=model,
        )

    async def call(
        self,
        sync_fn: Callable[[], T] | None,
        async_fn: Callable[[], Awaitable[T]] | None,
        *,
        model: object = None,
    ) -> CallResult[T]:
        """Call ``sync_fn`` or ``async_fn`` (whichever suits the mode and exists; ``async_fn``
        also in the sync API when ``model``, the model the call is for, does its I/O on the
        event loop: :func:`does_io_on_event_loop`), with the
        retry policy, per-attempt timeout, concurrency bound and token budget (an attempt
        the spent budget refuses fails with ``BudgetSpentError``). Never raises an
        ``Exception`` but LangGraph's control flow (``GraphBubbleUp``: ``GraphInterrupt``
        from ``interrupt()``, ``ParentCommand``), which propagates unretried; the last
        error is returned in the result."""
        if self.sync and async_fn is not None and does_io_on_event_loop(model):
            sync_fn = None
        start = time.perf_counter()
        attempts = 0
        failed: Exception | None = None  # the last attempt's error

        async def attempt() -> T:
            if self.semaphore is None:
                return await started()
            async with self.semaphore:
                return await started()

        async def started() -> T:
            nonlocal attempts, failed
            if self.budget is not None:
                self.budget.check()  # spent: this attempt does not start
            attempts += 1
            try:
                value = await self._once(sync_fn, async_fn)
            except Exception as exc:
                failed = exc
                raise
            if self.budget is not None:
                self.budget.charge(value)
            return value

        try:
            if self.retry is None or self.retry.max_attempts <= 1:
                value = await attempt()
            else:
                value = await self._retrying()(attempt)
        except CallAborted:
            raise  # Ctrl-C or exit inside the call: the run ends, the loop lives on
        except GraphBubbleUp:
            # LangGraph control flow (interrupt(), a Command for the parent graph): not a
            # failure, never retried; it ends the run and LangGraph handles it.
            raise
        except Exception as exc:  # recorded, not raised: a failed call is data
            if isinstance(exc, BudgetSpentError) and failed is not None:
                exc = failed  # a retry the budget refused: the call failed with this
            return CallResult(None, exc, attempts, time.perf_counter() - start)
        return CallResult(value, None, attempts, time.perf_counter() - start)

    def retry_wait(self, error: Exception) -> float | None:
        """For an attempt that failed elsewhere (one sample of a multi-sample call): how long
        to wait before retrying it under this caller's policy (its backoff, or the server's
        Retry-After if longer), or ``None`` when the policy would not retry ``error``."""
        policy = self.retry
        if policy is None or policy.max_attempts <= 1 or not _retry_predicate(policy)(error):
            return None
        asked = retry_after_s(error)
        backoff = policy.initial_interval
        return max(backoff, min(asked, policy.max_interval)) if asked is not None else backoff

    def after_one_attempt(self) -> Caller:
        """This caller with one attempt fewer (the first one was made elsewhere)."""
        assert self.retry is not None
        fewer = self.retry._replace(max_attempts=max(1, self.retry.max_attempts - 1))
        return replace(self, retry=fewer)

    def _retrying(self) -> AsyncRetrying:
        policy = self.retry
        assert policy is not None
        jitter = wait_random(0, policy.initial_interval) if policy.jitter else wait_none()
        backoff = (
            wait_exponential(
                multiplier=policy.initial_interval,
                exp_base=policy.backoff_factor,
                max=policy.max_interval,
            )
            + jitter
        )

        def wait(state: RetryCallState) -> float:
            # A server that said when to come back (429/503 Retry-After) is not retried sooner.
            delay = float(backoff(state))
            outcome = state.outcome
            error = outcome.exception() if outcome is not None and outcome.failed else None
            asked = retry_after_s(error)
            if asked is None:
                return delay
            return max(delay, min(asked, policy.max_interval))

        return AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=wait,
            retry=retry_if_exception(_retry_predicate(policy)),
            reraise=True,
        )

    async def _once(
        self,
        sync_fn: Callable[[], T] | None,
        async_fn: Callable[[], Awaitable[T]] | None,
    ) -> T:
        use_async = async_fn is not None and (not self.sync or sync_fn is None)
        # Set if this attempt is cancelled or times out; the call sees it (and so do the
        # threads it starts, which copy the context), see stop_requested().
        stop = _StopFlag()
        token = _STOP.set(stop)
        try:
            if use_async:
                assert async_fn is not None
                awaitable: Awaitable[T] = async_fn()
            else:
                assert sync_fn is not None
                ctx = contextvars.copy_context()
                loop = asyncio.get_running_loop()
                awaitable = loop.run_in_executor(THREAD_POOL, ctx.run, _guarded, sync_fn)
            if self.timeout is None:
                return await awaitable
            deadline = asyncio.timeout(self.timeout)
            try:
                async with deadline:
                    return await awaitable
            except Exception as exc:
                # Past the deadline, the attempt timed out, whatever the cancelled call raised
                # on its way out (an HTTP client whose own timeout, passed down from ours, fired
                # in the same loop iteration raises its own error class).
                if not deadline.expired():
                    raise
                msg = f"call did not finish within {self.timeout:g} s"
                raise TimeoutError(msg) from (None if isinstance(exc, TimeoutError) else exc)
        except BaseException:
            stop.requested = True  # a blocking backend still working on it stops at once
            raise
        finally:
            _STOP.reset(token)

    async def call_function(self, fn: Callable[..., Any], *args: Any) -> CallResult[Any]:
        """Call a plain function, sync or async (a coroutine function is awaited; a sync one
        runs on the thread pool so it cannot block the event loop)."""
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        ):
            return await self.call(None, lambda: fn(*args))
        return await self.call(lambda: fn(*args), None)


ROLE_KEY = "fusion_graph_role"
"""Metadata key naming the role of a model call: generator, critic, fusor or judge."""
INDEX_KEY = "fusion_graph_candidate_index"
"""Metadata key holding the candidate index of a generator or critic call."""


def role_config(
    config: RunnableConfig,
    *,
    role: str,
    run_name: str,
    index: int | None = None,
    stream: bool = False,
) -> RunnableConfig:
    """A child config tagged with the call's role (and candidate index). Unless ``stream``,
    the call is kept out of LangGraph's ``messages`` stream, so only the final answer
    streams token by token.

    A shallow copy: this runs once per model call, N at a time, so it stays cheap."""
    child = RunnableConfig(**config)
    child.pop("run_id", None)  # the caller's run id belongs to the caller's run
    child["run_name"] = run_name
    metadata = {**config.get("metadata", {}), ROLE_KEY: role}
    if index is not None:
        metadata[INDEX_KEY] = index
    child["metadata"] = metadata
    if not stream:
        child["tags"] = [*config.get("tags", []), TAG_NOSTREAM]
    return child


def inner_model(target: object) -> object:
    """The model inside any ``RunnableBinding`` s (``bind``, ``bind_tools``,
    ``with_config``, ...)."""
    while isinstance(target, RunnableBinding):
        target = target.bound
    return target


def does_io_on_event_loop(model: object) -> bool:
    """Whether ``model`` (seen through bindings) says its async calls do their network I/O
    on the event loop itself (an ``io_on_event_loop`` attribute set to True, as
    :class:`~fusion_graph.integrations.openai_compat.ChatOpenAICompatible` has).

    The sync API then calls it with ``ainvoke`` on its background event loop too, rather
    than with ``invoke`` on a worker thread each: 64 requests in flight are then 64 sockets
    on one thread, not 64 threads taking turns at the GIL on two cores (on the
    OpenAI-compatible benchmark, the sync rows' CPU per request halved, see
    benchmarks/README.md)."""
    return getattr(inner_model(model), "io_on_event_loop", False) is True


def model_name(target: object) -> str:
    """A readable name for a model, Runnable or function."""
    inner = getattr(target, "bound", target)  # RunnableBinding (bind_tools, bind)
    for attr in ("model_name", "model", "model_id"):
        value = getattr(inner, attr, None)
        if isinstance(value, str) and value:
            return value
    if isinstance(inner, Runnable):
        return inner.get_name()
    return getattr(inner, "__name__", type(inner).__name__)


def model_fields(target: object) -> Mapping[str, Any]:
    """The pydantic fields of a model (seen through a ``RunnableBinding``), or none."""
    inner = getattr(target, "bound", target)
    fields = getattr(type(inner), "model_fields", None)
    return fields if isinstance(fields, Mapping) else {}
