"""The live view of one ``ask`` run on stderr.

On a terminal: a table (one row per candidate, then the decision) whose clock ticks while
the candidates run, with the fused answer's tokens below it as the fusor streams them.
Elsewhere (a pipe, a log file, CI): one plain line per event. Every text shown comes from
models or errors, so it is escaped: a ``[fallback]`` in it is text, not rich markup.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from langchain_core.messages import AIMessageChunk
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fusion_graph.events import DecisionMade, FusionEvent

_STYLES = {"ok": "green", "failed": "red", "running": "yellow", "cancelled": "magenta"}


def describe_decision(event: DecisionMade) -> str:
    """The decision in words (plain text, not markup)."""
    if event["fallback"]:
        return f"fell back to {event['method']}: {event['fallback_reason']}"
    if event["fused"]:
        return f"fused by {event['method']} in {event['latency_s']:.2f} s"
    score = event["score"]
    scored = f" (score {score:g})" if isinstance(score, int | float) else ""
    return f"selected candidate {event['selected_index']}{scored} by {event['method']}"


class RunDisplay:
    """Shows a run's progress events (:meth:`on_event`) and the fused answer's tokens
    (:meth:`on_token`); use it as a context manager around the run."""

    def __init__(self, n: int, console: Console) -> None:
        self.n = n
        self.console = console
        self.live_mode = console.is_terminal
        self.rows: dict[int, dict[str, Any]] = {}
        self.decision = ""
        self.answer: list[str] = []
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._live: Live | None = None

    def __enter__(self) -> RunDisplay:
        if self.live_mode:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        else:
            self._line(f"{self.n} candidates")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(exc_type, exc, tb)
        elif exc_type is None:
            ok = sum(r["status"] == "ok" for r in self.rows.values())
            self._line(f"{self.n} candidates done ({ok} ok)")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def _line(self, text: str) -> None:
        if not self.live_mode:
            line = f"[{self.seconds:6.1f} s] {text}"
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_event(self, event: FusionEvent) -> None:
        with self._lock:
            if event["event"] == "candidate_started":
                self.rows[event["index"]] = {"model": event["model"], "status": "running"}
                self._line(f"candidate {event['index']} ({event['model']}) started")
            elif event["event"] == "candidate_finished":
                error = event["error"]
                row = {
                    "model": event["model"],
                    "status": event["status"],
                    "tokens": event["output_tokens"],
                    "seconds": event["latency_s"],
                    "error": f"{error['type']}: {error['message']}" if error else None,
                    "score": event["critique_score"],
                }
                self.rows[event["index"]] = row
                detail = f"{row['tokens']} tokens" if row["tokens"] is not None else "done"
                if error:
                    detail = f"{row['status']}, {row['error']}"
                self._line(
                    f"candidate {event['index']} finished in {row['seconds']:.2f} s: {detail}"
                )
            elif event["event"] == "decision_started":
                self.decision = f"deciding ({event['method']}) ..."
                self._line(self.decision)
            else:
                self.decision = describe_decision(event)
                self._line(self.decision)

    def on_token(self, chunk: AIMessageChunk) -> None:
        with self._lock:
            if chunk.text:
                self.answer.append(chunk.text)

    def interrupted(self) -> str:
        """Marks what was still running as cancelled; returns a sentence on what finished."""
        with self._lock:
            done = sum(r["status"] in ("ok", "failed") for r in self.rows.values())
            for row in self.rows.values():
                if row["status"] == "running":
                    row["status"] = "cancelled"
            self.decision = "interrupted"
        return f"{done} of {self.n} candidates had finished; nothing was decided"

    def __rich__(self) -> RenderableType:
        with self._lock:
            table = Table(
                title=f"{self.n} candidates, {self.seconds:.1f} s",
                title_justify="left",
                caption=escape(self.decision) or None,
                caption_justify="left",
            )
            for column in ("#", "model", "status", "tokens", "seconds"):
                table.add_column(column)
            for i in range(self.n):
                row = self.rows.get(i, {"model": "", "status": "waiting"})
                status = row["status"]
                label = f"failed ({row['error']})" if status == "failed" else status
                style = _STYLES.get(status, "dim")
                table.add_row(
                    str(i),
                    escape(str(row["model"])),
                    f"[{style}]{escape(label)}[/]",
                    "" if row.get("tokens") is None else str(row["tokens"]),
                    "" if row.get("seconds") is None else f"{row['seconds']:.2f}",
                )
            if not self.answer:
                return table
            return Group(table, Text("".join(self.answer)[-600:], style="cyan"))
