"""Traces reach a real Arize Phoenix: a FusioN subgraph run, exported over OTLP/HTTP to a
Phoenix started on loopback, read back through its REST API.

Phoenix lives in its own virtualenv (``make phoenix``: about 150 packages that the main
environment does not need). Start-up takes 9-15 s, so one server serves the module.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fusion_graph import create_fusion_graph
from fusion_graph.integrations.opentelemetry import FusionGraphInstrumentor, configure_otlp
from fusion_graph.testing import FakeChatModel

pytestmark = pytest.mark.server

PHOENIX_PYTHON = Path(__file__).resolve().parents[2] / ".venv-phoenix" / "bin" / "python"

# Phoenix binds its gRPC receiver to [::] (every interface) whatever the configuration;
# PHOENIX_GRPC_PORT=0 only picks a random port. This keeps it on loopback too.
LOOPBACK_GRPC = """\
import grpc.aio._server as _server

_add_insecure_port = _server.Server.add_insecure_port


def _loopback_only(self, address):
    return _add_insecure_port(self, address.replace("[::]:", "127.0.0.1:", 1))


_server.Server.add_insecure_port = _loopback_only
"""


@dataclass(frozen=True)
class Phoenix:
    url: str
    process: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response) if response.status == 200 else None


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    if not PHOENIX_PYTHON.exists():
        pytest.fail(f"{PHOENIX_PYTHON} is missing: run `make phoenix` to create it")
    tmp = tmp_path_factory.mktemp("phoenix")
    (tmp / "wd").mkdir()
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(LOOPBACK_GRPC)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "OTEL_"))},
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": "0",
        "PHOENIX_WORKING_DIR": str(tmp / "wd"),
        "TMPDIR": str(tmp),
        "PHOENIX_SQL_DATABASE_URL": "sqlite:///:memory:",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_DISABLE_AGENT_ASSISTANT": "true",
        "PHOENIX_LOG_MIGRATIONS": "false",
        "PYTHONPATH": str(tmp / "site"),
    }
    log = (tmp / "phoenix.log").open("wb")
    process = subprocess.Popen(
        [str(PHOENIX_PYTHON), "-m", "phoenix.server.main", "serve"],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            if process.poll() is not None:
                pytest.fail(f"Phoenix exited ({process.returncode}):\n{_tail(tmp)}")
            if time.monotonic() > deadline:
                pytest.fail(f"Phoenix was not ready within 45 s:\n{_tail(tmp)}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        yield Phoenix(url, process)
    finally:
        process.send_signal(signal.SIGINT)  # SIGTERM would leave a pid file behind
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _tail(tmp: Path) -> str:
    return (tmp / "phoenix.log").read_text(errors="replace")[-3000:]


def _spans(phoenix: Phoenix, project: str, expected: int) -> list[dict[str, Any]]:
    """The project's spans, once ``expected`` of them arrived (404 until it exists)."""
    spans: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            spans = _get(f"{phoenix.url}/v1/projects/{project}/spans?limit=100")["data"]
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        if len(spans) >= expected:
            return spans
        time.sleep(0.1)
    pytest.fail(f"{len(spans)} of {expected} spans reached Phoenix: {spans}")


def _sockets(pid: int) -> list[tuple[str, str, str]]:
    """``(state, local address, remote address)`` of the process's TCP sockets."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((fields[3], _address(fields[1]), _address(fields[2])))
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per-word LE
    return f"{ipaddress.ip_address(raw)}:{int(port, 16)}"


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_fusion_traces_reach_phoenix(phoenix: Phoenix) -> None:
    project = f"fusion-graph-test-{uuid.uuid4().hex[:12]}"
    provider = configure_otlp(phoenix.url, project=project)
    texts = [f"candidate-text-{uuid.uuid4().hex}" for _ in range(3)]
    question, answer = f"question-{uuid.uuid4().hex}", f"answer-{uuid.uuid4().hex}"
    try:
        graph = create_fusion_graph(
            FakeChatModel(replies=texts, model_name="gen"),
            n=3,
            strategy="fusion",
            fusor=FakeChatModel(replies=[answer], model_name="fusor"),
        ).compile()
        out = graph.invoke({"messages": [("user", question)]})
        assert out["messages"][-1].content == answer
        assert provider.force_flush(10_000)
    finally:
        FusionGraphInstrumentor().uninstrument()
        provider.shutdown()

    spans = _spans(phoenix, project, expected=6)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    assert sorted(by_name) == [
        "chat gen",
        "fusion_graph.decide",
        "fusion_graph.fuse",
        "fusion_graph.generate",
    ]
    [generate], [decide], [fuse] = (
        by_name[f"fusion_graph.{name}"] for name in ("generate", "decide", "fuse")
    )
    for phase, span in (("generate", generate), ("decide", decide)):
        assert span["span_kind"] == "CHAIN"
        assert span["attributes"]["fusion_graph.phase"] == phase
    candidates = sorted(
        by_name["chat gen"], key=lambda s: s["attributes"]["fusion_graph.candidate.index"]
    )
    assert len(candidates) == 3
    for i, span in enumerate(candidates):
        assert span["span_kind"] == "LLM"
        assert span["parent_id"] == generate["context"]["span_id"]
        assert span["status_code"] != "ERROR"
        attributes = span["attributes"]
        assert attributes["fusion_graph.candidate.index"] == i
        assert attributes["gen_ai.usage.output_tokens"] == 1
        assert attributes["gen_ai.usage.input_tokens"] == 1
    assert fuse["span_kind"] == "LLM"
    assert fuse["parent_id"] == decide["context"]["span_id"]
    assert fuse["attributes"]["fusion_graph.decision.fused"] is True
    assert decide["attributes"]["fusion_graph.candidates.succeeded"] == 3
    # Content capture is off: no prompt, candidate or answer text reached Phoenix.
    dump = json.dumps(spans)
    for text in [*texts, question, answer]:
        assert text not in dump

    # Phoenix listens on loopback only and talked to nothing else.
    if sys.platform == "linux":
        sockets = _sockets(phoenix.process.pid)
        listening = [local for state, local, _ in sockets if state == "0A"]
        assert f"127.0.0.1:{phoenix.url.rsplit(':', 1)[1]}" in listening
        assert all(_is_loopback(local) for local in listening), sockets
        assert all(_is_loopback(remote) for state, _, remote in sockets if state != "0A"), sockets
