"""The Ray tier's cluster: a real Ray cluster on loopback for the session, a head node and
one more worker node joined with ``ray start --address`` (1 CPU each), in a temporary
directory of its own; the test process is its driver. Teachers are the fake
OpenAI-compatible server of ``tests/faults`` (it counts requests and requests in flight).

Teardown stops exactly this cluster's processes (``ray stop`` would stop every Ray on the
machine): the ones whose command line names the cluster's temp dir (GCS, raylets, their
agents), and their children (the workers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.conftest import afresh
from tests.faults.fake_openai import FakeOpenAI

RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = "127.0.0.2"
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


@dataclass
class Cluster:
    """The running cluster."""

    address: str
    temp_dir: Path

    def node_pids(self) -> list[int]:
        """Processes of this cluster (GCS, raylets, agents): their command line names its
        temp dir."""
        mine = str(self.temp_dir)
        return [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and mine in _cmdline(int(p.name))
        ]

    def pids(self) -> set[int]:
        """Every process of this cluster, workers included."""
        todo, seen = self.node_pids(), set()
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                todo += _children(pid)
        return seen

    def workers(self, title: str) -> list[int]:
        """The worker processes whose title (``ray::<actor class>``) starts with ``title``."""
        return sorted(p for p in self.pids() if _cmdline(p).startswith(title))

    def stop(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    import ray

    port = _free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))
    # 127.0.0.2, not 127.0.0.1: Ray replaces "127.0.0.1" and "localhost" in a cluster
    # address with the machine's own network address (so other machines could reach it);
    # any other loopback address is left alone, and the whole cluster stays on loopback.
    cluster = Cluster(address=f"{LOOPBACK}:{port}", temp_dir=temp_dir)
    common = ["--node-ip-address", LOOPBACK, "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [RAY, "start", "--head", "--port", str(port), "--include-dashboard=false",
             "--temp-dir", str(temp_dir), *common],
            check=True, env=ENV, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [RAY, "start", "--address", cluster.address, *common],
            check=True, env=ENV, capture_output=True, timeout=120,
        )  # fmt: skip
        os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        ray.init(address=cluster.address, log_to_driver=False, _node_ip_address=LOOPBACK)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("CPU", 0) < 2:
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(0.2)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """The fake teachers' server, configured afresh (no faults, nothing recorded)."""
    yield from afresh(fake_server)
