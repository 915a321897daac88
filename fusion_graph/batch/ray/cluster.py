"""What the workers of a Ray job share: the candidate store and the endpoints' bounds.

:class:`StoreServer` is a Ray actor that owns the job's candidate store (the same SQLite
file, schema and keys as the single-machine job's :class:`~fusion_graph.batch.CandidateStore`)
on the driver's node; every worker reads and records through a :class:`ClusterStore`, a
``CandidateStore`` whose methods are calls to that actor. So any number of workers, on
any node, record into one store without a shared filesystem, each write committed at once
(``INSERT OR IGNORE``: a retried call records nothing twice), and a later job (``synth``
or ``eval``, on Ray or not) replays from that same file.

:class:`EndpointGate` is a Ray actor holding, per endpoint (base URL), the slots of
requests in flight across the whole cluster: every request a worker sends to an
OpenAI-compatible endpoint holds one (:func:`gate_models`), on top of the process's own
:func:`~fusion_graph.integrations.endpoint_limits.endpoint_limiter`. The limit is the one
a single-machine job would have (the smallest ``concurrency=`` any spec names for that URL,
else ``--endpoint-concurrency``, else 64 on loopback and 16 elsewhere). Each worker
process sends a heartbeat every :data:`HEARTBEAT_S` seconds; the slots of a process not
heard from for :data:`STALE_S` (killed mid-request) are taken back, so a dead worker never
holds a slot for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage

from fusion_graph.batch.models import ModelHandle
from fusion_graph.batch.store import CandidateStore, StoreConflictError, StoredCandidate
from fusion_graph.integrations.endpoint_limits import default_limit, endpoint_key

HEARTBEAT_S = 1.0
"""How often each worker process tells the gate it is alive."""
STALE_S = 8.0
"""A process not heard from for this long has its slots taken back."""


# --- the store ---------------------------------------------------------------------------------


class StoreServer:
    """The job's :class:`CandidateStore`, served by one Ray actor (see the module docs)."""

    def __init__(self, path: str) -> None:
        self._store = CandidateStore(path)

    def call(self, method: str, kwargs: dict[str, Any]) -> Any:
        try:
            return getattr(self._store, method)(**kwargs)
        except StoreConflictError as exc:  # returned, not raised: the worker re-raises it
            return exc


class ClusterStore(CandidateStore):
    """A :class:`CandidateStore` whose reads and writes are calls to a :class:`StoreServer`
    actor (thread safe, picklable; ``close`` leaves the actor to its owner, the driver)."""

    def __init__(self, server: Any, path: Path | str) -> None:  # no SQLite of its own
        self.path = Path(path)
        self._server = server

    def _call(self, method: str, **kwargs: Any) -> Any:
        import ray

        result = ray.get(self._server.call.remote(method, kwargs))
        if isinstance(result, StoreConflictError):
            raise result
        return result

    def close(self) -> None:
        return None

    def get_candidates(
        self,
        *,
        prompt_id: str,
        model: str,
        settings: str,
        indices: Iterable[int],
        input_hash: str,
    ) -> dict[int, StoredCandidate]:
        found: dict[int, StoredCandidate] = self._call(
            "get_candidates",
            prompt_id=prompt_id,
            model=model,
            settings=settings,
            indices=list(indices),
            input_hash=input_hash,
        )
        return found

    def put_candidate(self, **kwargs: Any) -> bool:
        return bool(self._call("put_candidate", **kwargs))

    def get_call(self, key: str) -> AIMessage | None:
        message: AIMessage | None = self._call("get_call", key=key)
        return message

    def put_call(self, key: str, **kwargs: Any) -> None:
        self._call("put_call", key=key, **kwargs)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self._call("counts")
        return counts


def start_store(path: Path) -> Any:
    """A :class:`StoreServer` actor for ``path`` on this (the driver's) node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(StoreServer).options(
        num_cpus=0, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1
    )
    server: Any = actor.remote(str(path))
    ray.get(server.call.remote("counts", {}))  # opened (a bad file fails here, not in a worker)
    return server


# --- the endpoint gate -------------------------------------------------------------------------


class EndpointGate:
    """Cluster-wide slots per endpoint (an async Ray actor; see the module docs).

    A request takes a slot with :meth:`acquire` (a ticket of its own, the worker process
    that holds it, the limit its spec names) and gives it back with :meth:`release`, also
    when it gave up before the slot came (then the ticket is never granted)."""

    def __init__(self) -> None:
        self._limits: dict[str, int] = {}
        self._explicit: set[str] = set()
        self._held: dict[str, tuple[str, str]] = {}
        """ticket -> (endpoint, holder)"""
        self._dropped: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._peak: Counter[str] = Counter()
        self._seen: dict[str, float] = {}
        self._changed: dict[str, asyncio.Condition] = {}

    def _set_limit(self, key: str, limit: int | None) -> None:
        if limit is None:
            self._limits.setdefault(key, default_limit(key))
        elif key not in self._explicit or limit < self._limits[key]:
            self._limits[key] = limit  # the smallest named limit wins, as in one process
            self._explicit.add(key)

    def _sweep(self) -> None:
        """Take back the slots of processes not heard from for :data:`STALE_S`."""
        now = time.monotonic()
        gone = {h for h, seen in self._seen.items() if now - seen > STALE_S}
        for ticket, (key, holder) in list(self._held.items()):
            if holder in gone:
                del self._held[ticket]
                self._in_flight[key] -= 1
        for holder in gone:
            del self._seen[holder]

    async def acquire(self, key: str, holder: str, ticket: str, limit: int | None) -> bool:
        """Wait for a slot; False when the ticket was released first (its caller gave up)."""
        self._seen[holder] = time.monotonic()
        self._set_limit(key, limit)
        changed = self._changed.setdefault(key, asyncio.Condition())
        async with changed:
            while self._in_flight[key] >= self._limits[key] and ticket not in self._dropped:
                self._sweep()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
            if ticket in self._dropped:
                self._dropped.discard(ticket)
                return False
            self._in_flight[key] += 1
            self._peak[key] = max(self._peak[key], self._in_flight[key])
            self._held[ticket] = (key, holder)
        return True

    async def release(self, ticket: str) -> None:
        entry = self._held.pop(ticket, None)
        if entry is None:  # not granted (yet): it never will be
            self._dropped.add(ticket)
            for changed in self._changed.values():  # wake its acquire, wherever it waits
                async with changed:
                    changed.notify_all()
            return
        key = entry[0]
        self._in_flight[key] -= 1
        changed = self._changed[key]
        async with changed:
            changed.notify_all()  # a woken waiter whose ticket was dropped takes nothing

    def heartbeat(self, holder: str) -> None:
        self._seen[holder] = time.monotonic()

    def state(self) -> dict[str, dict[str, int]]:
        """Per endpoint: its limit, requests in flight now and the most ever at once."""
        return {
            key: {"limit": limit, "in_flight": self._in_flight[key], "peak": self._peak[key]}
            for key, limit in self._limits.items()
        }


def start_gate() -> Any:
    """An :class:`EndpointGate` actor for one job (it ends with the driver)."""
    import ray

    return ray.remote(EndpointGate).options(num_cpus=0, max_concurrency=10_000).remote()


class GateClient:
    """A worker process's side of the gate: slots, and the heartbeat thread."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate
        self.holder = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tickets = itertools.count()
        self._beating = False
        self._lock = threading.Lock()

    def _start_heartbeat(self) -> None:
        with self._lock:
            if self._beating:
                return
            self._beating = True

        def beat() -> None:
            while True:
                self.gate.heartbeat.remote(self.holder)
                time.sleep(HEARTBEAT_S)

        threading.Thread(target=beat, name="fusion-graph-gate-heartbeat", daemon=True).start()

    @contextlib.asynccontextmanager
    async def slot(self, key: str, limit: int | None) -> AsyncIterator[None]:
        self._start_heartbeat()
        ticket = f"{self.holder}-{next(self._tickets)}"
        try:
            granted = await self.gate.acquire.remote(key, self.holder, ticket, limit)
            assert granted
            yield
        finally:
            self.gate.release.remote(ticket)  # granted or not: see EndpointGate


class GatedModel:
    """A replica's chat model whose requests each hold a slot of the cluster's gate."""

    def __init__(self, model: Any, client: GateClient, key: str, limit: int | None) -> None:
        self.model = model
        self.client = client
        self.key = key
        self.limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    async def ainvoke(self, *args: Any, **kwargs: Any) -> Any:
        async with self.client.slot(self.key, self.limit):
            return await self.model.ainvoke(*args, **kwargs)

    async def asample_n(self, *args: Any, **kwargs: Any) -> Any:
        async with self.client.slot(self.key, self.limit):
            return await self.model.asample_n(*args, **kwargs)


def endpoint_limit(handle: ModelHandle, explicit: int | None) -> int | None:
    """The limit a handle's spec names for its endpoints (``concurrency=``, else the job's
    ``--endpoint-concurrency``), or None (the endpoint's default)."""
    spec = handle.spec
    named = spec.options.get("concurrency") if spec is not None else None
    return int(named) if named is not None else explicit


def gate_models(handles: Sequence[ModelHandle], client: GateClient, explicit: int | None) -> None:
    """Put every remote replica of ``handles`` behind the gate (in place; the embedded
    model runs in the worker and is bounded there)."""
    for handle in handles:
        limit = endpoint_limit(handle, explicit)
        for replica in handle.replicas:
            if replica.endpoint == "local" or isinstance(replica.model, GatedModel):
                continue
            key = endpoint_key(replica.endpoint)
            replica.model = GatedModel(replica.model, client, key, limit)


# --- the Ray instance --------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(address: str | None = None, **init: Any) -> Iterator[None]:
    """Ray for one job: the cluster at ``address`` (``auto``, ``ray://host:10001``,
    ``host:6379``), else a local instance on loopback started for the job and stopped after
    it (with Ray's usage reporting off unless ``RAY_USAGE_STATS_ENABLED`` says otherwise).
    Inside an already initialised Ray (a user's own script), that one, left running."""
    import ray

    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"log_to_driver": True, "configure_logging": False, **init}
    if address not in (None, "local"):
        ray.init(address=address, **options)
        try:
            yield
        finally:
            ray.shutdown()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a throwaway instance: no reports
    options.setdefault("_node_ip_address", "127.0.0.1")
    options.setdefault("include_dashboard", False)
    with _single_node_on_loopback():
        ray.init(address="local", **options)
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def _single_node_on_loopback() -> Iterator[None]:
    """Keep a local Ray on loopback. A Ray node otherwise advertises (and its processes
    connect over) the machine's network address, so that other nodes could join; Ray's own
    switch for single-node mode is the setting it uses on macOS and Windows, read from the
    environment by the processes it starts and at import by this one."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def gate_state(gate: Any) -> Mapping[str, Mapping[str, int]]:
    """The gate's per-endpoint limit, in-flight count and peak."""
    import ray

    state: Mapping[str, Mapping[str, int]] = ray.get(gate.state.remote())
    return state
