"""Model specs: one string names a model, for the command line, the batch jobs, the proxy
and the examples::

    local[:OPTS]                       the embedded model (Qwen2.5-Coder-1.5B-Instruct, CPU)
    openai:URL:MODEL[:OPTS]            any OpenAI-compatible server (vLLM, llama.cpp server, ...)
    vllm:URL:MODEL[:OPTS]              a vLLM server: a prompt's k samples in one request (n=k)

``URL`` may list replicas of one model joined by ``+`` (``http://a:8000/v1+http://b:8000/v1``).
``OPTS`` is ``key=value,key=value`` with ``temperature``, ``top_p``, ``max_tokens``, ``seed``,
``name`` (a display or column name), ``concurrency`` (calls in flight per endpoint),
``timeout`` (seconds per call), ``api_key_env``, the penalties against repetition
(:data:`PENALTIES`) and, for ``local``, ``model`` (a packaged model:
``qwen2.5-coder-1.5b``, the default; ``smollm2-135m``; ``qwen2.5-coder-0.5b``; or a chat
GGUF file's path; ``path`` is the same for a file). :func:`build_model` turns a spec (and
one of its URLs) into a LangChain chat model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.language_models import BaseChatModel

from fusion_graph.integrations.llama_cpp_models import (
    PACKAGED_MODELS,
    default_model,
    model_file,
)

Kind = Literal["local", "openai", "vllm"]
KINDS: tuple[Kind, ...] = ("local", "openai", "vllm")

SPEC_HELP = (
    "A model spec is 'local[:OPTS]' (the embedded model), 'openai:URL:MODEL[:OPTS]' (any "
    "OpenAI-compatible server) or 'vllm:URL:MODEL[:OPTS]' (a vLLM server; a prompt's samples "
    "in one request). URL may join replicas of one model with '+'. OPTS is key=value,... "
    "with temperature, top_p, max_tokens, seed, name, concurrency (calls in flight per "
    "endpoint), timeout, api_key_env, repeat_penalty (local, vllm), presence_penalty and "
    "frequency_penalty (openai, vllm), model (local: a packaged model or a GGUF path). "
    "E.g. local:model=smollm2-135m,temperature=0.3,name=a"
)

_OPTIONS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "max_tokens": int,
    "seed": int,
    "name": str,
    "concurrency": int,
    "timeout": float,
    "api_key_env": str,
    "path": str,
    "model": str,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
}
PENALTIES = ("repeat_penalty", "presence_penalty", "frequency_penalty")
"""Options against repetition: ``repeat_penalty`` (>= 1; local: llama.cpp's, vllm: vLLM's
``repetition_penalty``), ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, -2 to 2;
openai and vllm)."""
_PENALTY_KINDS: dict[str, tuple[str, ...]] = {
    "repeat_penalty": ("local", "vllm"),
    "presence_penalty": ("openai", "vllm"),
    "frequency_penalty": ("openai", "vllm"),
}
_URLS = re.compile(
    r"^(?P<urls>https?://[^/\s:+]+(?::\d+)?[^\s:+]*(?:\+https?://[^/\s:+]+(?::\d+)?[^\s:+]*)*)"
    r":(?P<rest>.+)$"
)


def _parse_options(text: str, spec: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _OPTIONS:
            msg = (
                f"model spec {spec!r}: {part!r} is not an option; options are "
                f"{', '.join(sorted(_OPTIONS))} (key=value, comma separated)"
            )
            raise ValueError(msg)
        try:
            options[key] = _OPTIONS[key](value.strip())
        except ValueError:
            msg = f"model spec {spec!r}: {key} needs a {_OPTIONS[key].__name__}, got {value!r}"
            raise ValueError(msg) from None
    for key in ("max_tokens", "concurrency"):
        if key in options and options[key] < 1:
            msg = f"model spec {spec!r}: {key} must be at least 1"
            raise ValueError(msg)
    if options.get("temperature", 0) < 0 or not 0 < options.get("top_p", 1) <= 1:
        msg = f"model spec {spec!r}: temperature must be >= 0 and top_p in (0, 1]"
        raise ValueError(msg)
    return options


def _check_penalties(kind: str, options: Mapping[str, Any], text: str) -> None:
    for name in PENALTIES:
        if name not in options:
            continue
        if kind not in _PENALTY_KINDS[name]:
            msg = (
                f"model spec {text!r}: {name}= is for {' and '.join(_PENALTY_KINDS[name])} "
                f"models; {kind} models take "
                f"{', '.join(p for p in PENALTIES if kind in _PENALTY_KINDS[p])}"
            )
            raise ValueError(msg)
        value = options[name]
        if (name == "repeat_penalty" and value < 1) or (
            name != "repeat_penalty" and abs(value) > 2
        ):
            allowed = ">= 1 (1 is off)" if name == "repeat_penalty" else "between -2 and 2"
            msg = f"model spec {text!r}: {name} must be {allowed}, not {value}"
            raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A parsed model spec (see the module docs)."""

    kind: Kind
    urls: tuple[str, ...] = ()
    model: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``text``; ``ValueError`` with a hint when it is malformed."""
        spec = text.strip()
        kind, _, rest = spec.partition(":")
        if kind not in KINDS:
            msg = f"model spec {text!r} must start with local, openai: or vllm:. {SPEC_HELP}"
            raise ValueError(msg)
        if kind == "local":
            options = _parse_options(rest, text)
            if "path" in options and not Path(options["path"]).expanduser().is_file():
                msg = f"model spec {text!r}: no GGUF file at {options['path']}"
                raise ValueError(msg)
            chosen = options.get("model")
            known = chosen is None or chosen in PACKAGED_MODELS
            if not known and not Path(str(chosen)).expanduser().is_file():
                msg = (
                    f"model spec {text!r}: {chosen!r} is neither a packaged model "
                    f"({', '.join(PACKAGED_MODELS)}) nor a GGUF file"
                )
                raise ValueError(msg)
            _check_penalties("local", options, text)
            return cls(kind="local", options=options, text=spec)
        found = _URLS.match(rest)
        if found is None:
            msg = (
                f"model spec {text!r}: expected {kind}:URL:MODEL[:OPTS], e.g. "
                f"{kind}:http://127.0.0.1:8000/v1:Qwen/Qwen2.5-7B-Instruct:temperature=0.3"
            )
            raise ValueError(msg)
        model, options_text = found["rest"], ""
        head, sep, tail = model.rpartition(":")
        if sep and "=" in tail:
            model, options_text = head, tail
        if not model.strip() or re.match(r"\d+([/:]|$)", model):
            # "openai:http://host:8000/v1" parses as host "http://host", model "8000/v1"
            msg = (
                f"model spec {text!r}: the model name is missing; write {kind}:URL:MODEL, "
                f"e.g. {kind}:http://127.0.0.1:8000/v1:Qwen/Qwen2.5-7B-Instruct"
            )
            raise ValueError(msg)
        local_only = {"path", "model"} & set(_parse_options(options_text, text))
        if local_only:
            msg = (
                f"model spec {text!r}: {sorted(local_only)[0]}= is for local models only "
                f"(the server's model name goes in {kind}:URL:MODEL)"
            )
            raise ValueError(msg)
        options = _parse_options(options_text, text)
        _check_penalties(kind, options, text)
        return cls(
            kind=cast("Kind", kind),
            urls=tuple(found["urls"].split("+")),
            model=model.strip(),
            options=options,
            text=spec,
        )

    def with_defaults(self, **values: Any) -> ModelSpec:
        """This spec with ``values`` for the options it does not set itself."""
        merged = {**{k: v for k, v in values.items() if v is not None}, **self.options}
        return ModelSpec(
            kind=self.kind, urls=self.urls, model=self.model, options=merged, text=self.text
        )

    def with_options(self, **values: Any) -> ModelSpec:
        """This spec with ``values`` overriding its own options."""
        merged = {**self.options, **{k: v for k, v in values.items() if v is not None}}
        return ModelSpec(
            kind=self.kind, urls=self.urls, model=self.model, options=merged, text=self.text
        )


def build_model(
    spec: ModelSpec,
    *,
    url: str | None = None,
    temperature: float = 0.7,
    max_tokens: int = 256,
    timeout: float | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    seed: int | None = None,
    max_concurrency: int | None = None,
) -> BaseChatModel:
    """The chat model ``spec`` names; its own options win over these defaults. ``url`` picks
    one of the spec's replicas (default: the first).

    Raises:
        ImportError: the extra the model needs is not installed (the message says which).
        FileNotFoundError: the embedded model's file is missing.
        ValueError: the spec cannot be served (e.g. no API key for a remote server).
    """
    options = spec.options
    temperature = float(options.get("temperature", temperature))
    max_tokens = int(options.get("max_tokens", max_tokens))
    timeout = options.get("timeout", timeout)
    seed = options.get("seed", seed)
    top_p = options.get("top_p")
    if spec.kind == "local":
        try:
            from fusion_graph.integrations.llama_cpp import ChatLocalModel

        except ImportError as exc:
            msg = (
                f"The embedded local model is not available ({exc}). Install it with "
                "`pip install 'fusion-graph[local]'` (or `make setup` in a checkout), or use "
                "an OpenAI-compatible server."
            )
            raise ImportError(msg) from exc
        local: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        chosen = options.get("model", options.get("path")) or default_model()
        model_file(chosen)  # a clear error now if it is not installed or not there
        local["model"] = chosen if chosen in PACKAGED_MODELS else str(Path(chosen).expanduser())
        if top_p is not None:
            local["top_p"] = top_p
        if seed is not None:
            local["seed"] = seed
        if "repeat_penalty" in options:
            local["repeat_penalty"] = options["repeat_penalty"]
        return ChatLocalModel(n_ctx=8192, **local)
    try:
        from fusion_graph.integrations.openai_compat import openai_compatible
    except ImportError as exc:
        msg = "OpenAI-compatible endpoints need `pip install 'fusion-graph[openai]'`."
        raise ImportError(msg) from exc
    remote: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
    if timeout is not None:
        remote["timeout"] = timeout
    if top_p is not None:
        remote["top_p"] = top_p
    if seed is not None:
        remote["seed"] = seed
    for name in ("presence_penalty", "frequency_penalty"):
        if name in options:
            remote[name] = options[name]
    if "repeat_penalty" in options:  # vLLM's sampling parameter, outside OpenAI's API
        remote["extra_body"] = {"repetition_penalty": options["repeat_penalty"]}
    concurrency = options.get("concurrency", max_concurrency)
    if concurrency is not None:
        remote["max_concurrency"] = int(concurrency)
    assert spec.model is not None
    return openai_compatible(
        url or spec.urls[0],
        spec.model,
        api_key_env=str(options.get("api_key_env", api_key_env)),
        max_retries=1,
        **remote,
    )
