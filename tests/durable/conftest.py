"""A real PostgreSQL server on loopback for the durable fan-out tests.

One server per test session: ``initdb`` into a fresh directory, ``postgres`` listening on
127.0.0.1 on a free port (its unix socket inside that directory too), a database for the
tests with LangGraph's checkpoint tables set up (``PostgresSaver.setup()``, once), and
``pg_ctl stop -m fast`` plus the directory removed afterwards.

PostgreSQL refuses to run as root, and CI runs as root: then ``initdb`` and ``postgres``
run as the ``postgres`` user that Debian's package creates (``nobody`` if there is none),
and the directory is handed to that user. The server binaries are looked up in ``PATH``,
then in ``/usr/lib/postgresql/*/bin`` (Debian's place; ``make postgres`` installs them).
A server that cannot start fails the tests with the end of its log: it never skips them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
DATABASE = "fusion_graph_durable"
SUPERUSER = "postgres"
START_TIMEOUT_S = 60.0
_INSTALL_HINT = "run `make postgres` (apt-get install postgresql) to install them"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl``."""
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)  # /usr/local/bin/initdb -> ...

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)

    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True):
        candidates.append(Path(initdb).parent)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "postgres", "pg_ctl")):
            return directory
    pytest.fail(
        "PostgreSQL's server binaries (initdb, postgres, pg_ctl) were not found in PATH nor "
        f"in /usr/lib/postgresql/*/bin (looked in {[str(c) for c in candidates]}); " + _INSTALL_HINT
    )


@dataclass(frozen=True)
class RunAs:
    """Whom the server runs as: this process's user, or (as root) an unprivileged one."""

    uid: int | None = None
    gid: int | None = None
    name: str | None = None

    @classmethod
    def for_postgres(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls()
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return cls(uid=entry.pw_uid, gid=entry.pw_gid, name=name)
        pytest.fail("running as root, and there is neither a 'postgres' nor a 'nobody' user")

    def popen_kwargs(self) -> dict[str, Any]:
        """``subprocess`` arguments that drop root (Python's own setuid/setgid)."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:] or "(empty)"
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class PostgresServer:
    """A running server and how to reach its test database."""

    bin_dir: Path
    root: Path
    port: int
    run_as: RunAs
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{database}?sslmode=disable"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        if self.run_as.name is not None:
            env.update(HOME=str(self.root), USER=self.run_as.name, LOGNAME=self.run_as.name)
        return env

    def _run(self, *command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            env=self._env(),
            cwd=self.root,
            timeout=timeout,
            check=False,
            **self.run_as.popen_kwargs(),
        )

    def start(self) -> None:
        self.socket_dir.mkdir()
        for path in (self.root, self.socket_dir):
            self.run_as.chown(path)
        done = self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        if done.returncode != 0:
            pytest.fail(
                f"initdb failed (exit {done.returncode}) as "
                f"{self.run_as.name or 'this user'}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-h",
                    HOST,
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.socket_dir),
                    "-c",
                    "max_connections=40",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C of pytest is not sent to the server too
                **self.run_as.popen_kwargs(),
            )
        self.run_as.chown(self.log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(
                    f"postgres exited with {self.process.returncode} before accepting "
                    f"connections; its log ends with:\n{_tail(self.log)}"
                )
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2, autocommit=True):
                    return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        pytest.fail(
            f"postgres did not accept connections on {HOST}:{self.port} within "
            f"{START_TIMEOUT_S:g} s (last error: {last}); its log ends with:\n{_tail(self.log)}"
        )

    def create_database(self, name: str = DATABASE) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", timeout=60)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A connection string to a fresh database on a PostgreSQL server of this session, with
    LangGraph's checkpoint tables in it."""
    bin_dir = postgres_bin_dir()
    # Not pytest's tmp_path: its directories are private to root, and the server may run as
    # another user. mkdtemp's directory is private too (0700) and handed over to that user.
    server = PostgresServer(
        bin_dir=bin_dir,
        root=Path(tempfile.mkdtemp(prefix="fusion-graph-pg-")),
        port=free_port(),
        run_as=RunAs.for_postgres(),
    )
    try:
        server.start()
        server.create_database()
        from langgraph.checkpoint.postgres import PostgresSaver

        with PostgresSaver.from_conn_string(server.url()) as saver:
            saver.setup()
        yield server.url()
    finally:
        server.stop()
