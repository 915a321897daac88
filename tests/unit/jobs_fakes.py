"""Fakes the batch-job tests share: judges that prefer the candidate naming Paris, and a
loopback OpenAI-compatible server whose replies depend on the model name and seed (the
``jobs_server`` fixture in ``tests/unit/conftest.py``)."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from langchain_core.messages import HumanMessage

from fusion_graph.testing import FakeCall

__all__ = ["FakeOpenAI", "pairwise_judge", "pointwise_or_pairwise"]


def pairwise_judge(call: FakeCall) -> str:
    """Prefers the fenced candidate that mentions Paris."""
    blocks = dict(re.findall(r'<candidate label="([AB])">\n(.*?)\n</candidate>', call.prompt, re.S))
    if "Paris" in blocks.get("A", "") and "Paris" not in blocks.get("B", ""):
        return '{"winner": "A"}'
    if "Paris" in blocks.get("B", "") and "Paris" not in blocks.get("A", ""):
        return '{"winner": "B"}'
    return '{"winner": "tie"}'


def pointwise_or_pairwise(call: FakeCall) -> str:
    if "Candidate A" in call.prompt:
        return pairwise_judge(call)
    fenced = call.prompt.split("<candidate", 1)[-1]
    return '{"score": 9}' if "Paris" in fenced else '{"score": 2}'


class FakeOpenAI:
    """A loopback chat-completions server: replies depend on the model name and seed; the
    model "broken" answers HTTP 500. Counts requests by model."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests[body["model"]] += 1
                server.bodies.append(body)
                status, payload = server.reply(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        model = body["model"]
        if model == "broken":
            return 500, {"error": {"message": "boom", "type": "server_error"}}
        text = " ".join(str(m["content"]) for m in body["messages"])
        n = int(body.get("n") or 1)
        seed = int(body.get("seed") or 0)
        if model == "judge":
            call = FakeCall([HumanMessage(text)], "judge", None, {})
            contents = [pointwise_or_pairwise(call)] * n
        elif model == "fusor":
            contents = ["The answer is Paris."] * n
        else:
            contents = [
                f"{model} answer {'Paris' if (seed + k) % 2 else 'Lyon'} {seed + k}"
                for k in range(n)
            ]
        choices = [
            {"index": k, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
            for k, c in enumerate(contents)
        ]
        usage = {"prompt_tokens": 10, "completion_tokens": 4 * n, "total_tokens": 10 + 4 * n}
        return 200, {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": choices,
            "usage": usage,
        }
