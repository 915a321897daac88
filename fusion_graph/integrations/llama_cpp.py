"""The embedded local chat model: llama.cpp running SmolLM2-135M-Instruct in this process.

Install it with ``pip install 'fusion-graph[local]'``; no server and no network are needed.

Thread safety
    Loaded models are cached per process with one lock per model file
    (:mod:`~fusion_graph.integrations.llama_cpp_loader`), so any number of
    :class:`ChatLocalModel` instances, threads and coroutines can share a model; their calls
    run one after another. The async methods run the sync path in a worker thread, so the
    event loop is never blocked, and a stream holds the lock until it ends or its consumer
    closes it.

Batching
    :meth:`ChatLocalModel.sample_n` decodes the prompt once and the N candidates as one batch
    in one llama.cpp context (:mod:`~fusion_graph.integrations.llama_cpp_batch`), each with its
    own seeded sampler chain: much faster than N separate calls, and reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field, model_validator

from fusion_graph.integrations.blocking import BlockingChatModel
from fusion_graph.integrations.chat_template import to_chat
from fusion_graph.integrations.llama_cpp_batch import sample_batch
from fusion_graph.integrations.llama_cpp_loader import LoadedModel, cpu_count, load_model
from fusion_graph.integrations.llama_cpp_models import (
    default_model,
    default_model_path,
    model_display_name,
    model_file,
)
from fusion_graph.integrations.llama_cpp_sampling import (
    MAX_SEED,
    SamplingOptions,
    chat_completion,
    check_seed,
    fresh_seed,
)
from fusion_graph.integrations.llama_cpp_tools import (
    forced_tool,
    json_grammar,
    structured_runnable,
    tool_reply,
    tool_specs,
)
from fusion_graph.integrations.repeat_guard import RepeatGuard
from fusion_graph.integrations.usage import token_usage
from fusion_graph.runtime import CallStopped, stop_requested

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Generator, Iterator, Sequence

    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import LanguageModelInput
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.runnables import Runnable

__all__ = ["ChatLocalModel", "default_model_path"]

_CALL_OPTIONS = frozenset({"temperature", "top_p", "max_tokens", "seed", "stop", "repeat_penalty"})
_IGNORED_OPTIONS = frozenset({"stream", "ls_structured_output_format"})
_TOOL_OPTIONS = ("tools", "tool_choice")
_CONSTRAINED_OPTIONS = ("response_format", "logprobs", "top_logprobs")


class ChatLocalModel(BlockingChatModel):
    """A LangChain chat model running a GGUF model in-process with llama.cpp.

    By default it runs Qwen2.5-Coder-1.5B-Instruct (``docs/models.md`` compares the packaged
    models: accuracy, loops, speed, memory). Safe to call
    from any number of threads and coroutines; calls on the same model file are serialised.
    :meth:`sample_n` / :meth:`asample_n` generate N candidates of one prompt in a single
    batched llama.cpp pass, which is much faster than N separate calls.
    """

    takes_json_schema: ClassVar[bool] = True
    """Replies follow an OpenAI-style ``response_format`` JSON schema (llama.cpp grammar)."""

    model: str = Field(default_factory=default_model)
    """A packaged model's name (``qwen2.5-coder-1.5b``, the default; ``smollm2-135m``, the
    fastest; ``qwen2.5-coder-0.5b``, in between; see ``docs/models.md``) or the path of a
    chat GGUF file. Unset: ``$FUSION_GRAPH_LOCAL_MODEL``, else the default."""
    model_path: str | None = None
    """Path of a chat GGUF file; when set it is used instead of ``model``."""
    temperature: float = Field(default=0.7, ge=0.0)
    """Sampling temperature; 0 picks the most likely token (greedy)."""
    max_tokens: int = Field(default=256, ge=1)
    """Maximum number of tokens to generate per reply."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling: sample among the most likely tokens covering this probability."""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    """Sampling seed; the same seed and prompt give the same reply. None draws a new seed."""
    n_ctx: int = Field(default=2048, ge=16)
    """Context length in tokens of one reply (prompt plus generated tokens)."""
    n_threads: int | None = Field(default=None, ge=1)
    """CPU threads llama.cpp uses; None uses every available core (fastest on an idle machine;
    when other processes keep the cores busy, fewer threads are slower but steadier)."""
    repeat_penalty: float = Field(default=1.1, ge=1.0)
    """llama.cpp's repetition penalty on the tokens generated so far (1 turns it off). With it,
    and the guard that ends a reply once a sentence comes round again, small models stop
    looping."""
    stop_repeats: bool = True
    """End a reply before a sentence of 3+ words comes round again (small models loop until
    ``max_tokens``); turn it off for text that repeats on purpose (refrains, templates)."""
    model_name: str = ""
    """Name reported in response metadata and traces; empty: the model's own name."""

    @model_validator(mode="after")
    def _default_name(self) -> ChatLocalModel:
        if not self.model_name:
            self.model_name = model_display_name(self.model_path or self.model)
        return self

    @property
    def _llm_type(self) -> str:
        return "fusion-graph-local-llama-cpp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model": self.model,
            "model_path": self.model_path,
            "repeat_penalty": self.repeat_penalty,
            "stop_repeats": self.stop_repeats,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "n_ctx": self.n_ctx,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "llama-cpp"
        params["ls_model_name"] = self.model_name
        return params

    # -- configuration ------------------------------------------------------------------------

    def _loaded(self) -> LoadedModel:
        path = model_file(self.model_path or self.model)
        n_threads = self.n_threads or cpu_count()
        return load_model(str(path.resolve()), self.n_ctx, n_threads)

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> SamplingOptions:
        unknown = set(kwargs) - _CALL_OPTIONS - _IGNORED_OPTIONS
        if unknown:
            msg = (
                f"ChatLocalModel does not accept {', '.join(sorted(unknown))}; the per-call "
                f"options are {', '.join(sorted(_CALL_OPTIONS))}."
            )
            raise TypeError(msg)
        temperature = float(kwargs.get("temperature", self.temperature))
        top_p = float(kwargs.get("top_p", self.top_p))
        max_tokens = int(kwargs.get("max_tokens", self.max_tokens))
        if temperature < 0:
            msg = f"temperature must be 0 or more, not {temperature}."
            raise ValueError(msg)
        if not 0 < top_p <= 1:
            msg = f"top_p must be above 0 and at most 1, not {top_p}."
            raise ValueError(msg)
        if max_tokens < 1:
            msg = f"max_tokens must be at least 1, not {max_tokens}."
            raise ValueError(msg)
        repeat_penalty = float(kwargs.get("repeat_penalty", self.repeat_penalty))
        if repeat_penalty < 1:
            msg = f"repeat_penalty must be 1 (off) or more, not {repeat_penalty}."
            raise ValueError(msg)
        stops = kwargs.get("stop", stop)
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        seed = kwargs.get("seed", self.seed)
        if seed is not None:
            seed = check_seed(seed)
        return SamplingOptions(
            temperature, top_p, max_tokens, seed, stops, repeat_penalty, self.stop_repeats
        )

    # -- tools --------------------------------------------------------------------------------

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: replies are constrained by a JSON-schema grammar to one valid tool
        call or a text answer (:mod:`~fusion_graph.integrations.llama_cpp_tools`).
        ``tool_choice``: ``None``/``"auto"``, ``"any"``/``"required"``, or a tool name."""
        specs = tool_specs(tools)
        forced_tool(tool_choice, specs)  # checked now, not at the first call
        return self.bind(tools=specs, tool_choice=tool_choice, **kwargs)

    # -- one reply ----------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        tools = {k: kwargs.pop(k) for k in _TOOL_OPTIONS if k in kwargs}
        constrained = {k: kwargs.pop(k) for k in _CONSTRAINED_OPTIONS if k in kwargs}
        opts = self._options(stop, kwargs)
        if tools.get("tools"):
            reply = tool_reply(self._loaded(), messages, opts, tools, model_name=self.model_name)
            return ChatResult(generations=[ChatGeneration(message=reply)])
        if constrained:
            reply = self._constrained_reply(messages, opts, **constrained)
            return ChatResult(generations=[ChatGeneration(message=reply)])
        # Streamed internally, so a cancelled or timed-out call stops between tokens.
        total: AIMessageChunk | None = None
        with contextlib.closing(self._iter_chunks(messages, opts)) as chunks:
            for chunk in chunks:
                piece = chunk.message
                assert isinstance(piece, AIMessageChunk)
                total = piece if total is None else total + piece
        assert total is not None
        message = AIMessage(
            content=total.content,
            usage_metadata=total.usage_metadata,
            response_metadata=total.response_metadata,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _constrained_reply(
        self,
        messages: list[BaseMessage],
        opts: SamplingOptions,
        *,
        response_format: Any = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ) -> AIMessage:
        """One reply by the batched decoder, which takes a grammar and reports logprobs:
        constrained to ``response_format``'s JSON schema, with OpenAI-format ``logprobs``
        in its metadata when asked for."""
        grammar = json_grammar(response_format) if response_format is not None else None
        if grammar is not None:  # penalising repeated JSON punctuation only hurts
            opts = dataclasses.replace(opts, repeat_penalty=1.0)
        k = int(top_logprobs or 0) if logprobs or top_logprobs else None
        chat = to_chat(messages, reader="the local model")
        seed = opts.seed if opts.seed is not None else fresh_seed()
        (reply,) = sample_batch(
            self._loaded,
            chat,
            [seed],
            opts,
            started=time.perf_counter(),
            model_name=self.model_name,
            grammar=grammar,
            top_logprobs=k,
        )
        if isinstance(reply, Exception):
            raise reply
        for key in ("batched", "batch_size"):  # one reply, though made by the batch decoder
            reply.response_metadata.pop(key, None)
        return reply

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: str = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Replies constrained by llama.cpp's grammar to ``schema`` (a pydantic model, a
        TypedDict or a JSON schema), parsed into it; ``include_raw`` returns
        ``{"raw", "parsed", "parsing_error"}`` as LangChain's chat models do. ``method`` is
        accepted for compatibility; every method is the JSON-schema grammar."""
        if kwargs:
            msg = f"with_structured_output got unknown arguments: {', '.join(sorted(kwargs))}"
            raise TypeError(msg)
        del method
        return structured_runnable(self, schema, include_raw=include_raw)

    # -- streaming ----------------------------------------------------------------------------

    def _iter_chunks(
        self, messages: list[BaseMessage], opts: SamplingOptions
    ) -> Generator[ChatGenerationChunk, None, None]:
        """Stream one reply, holding the model's lock until the generator ends or is closed."""
        chat = to_chat(messages, reader="the local model")
        entry = self._loaded()
        seed = opts.seed if opts.seed is not None else fresh_seed()
        with entry.lock:
            n_prompt, parts = chat_completion(entry, chat, opts, seed, stream=True, stop=opts.stop)
            guard = RepeatGuard(active=opts.stop_repeats)
            finish_reason: str | None = None
            with contextlib.closing(parts):
                for part in parts:
                    if stop_requested():  # cancelled or timed out: free the model now
                        msg = "the local model stopped: the call was cancelled or timed out"
                        raise CallStopped(msg)
                    choice = part["choices"][0]
                    finish_reason = choice.get("finish_reason") or finish_reason
                    text = guard.feed(choice["delta"].get("content") or "")
                    if text:
                        yield ChatGenerationChunk(message=AIMessageChunk(content=text))
                    if guard.stopped:
                        finish_reason = "stop"
                        break
            rest = guard.finish()
            if rest:
                yield ChatGenerationChunk(message=AIMessageChunk(content=rest))
            reply = guard.text
            # The stream reports no usage: count the reply's tokens by tokenising it.
            n_output = len(entry.llama.tokenize(reply.encode("utf-8"), add_bos=False))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=token_usage(n_prompt, n_output),
                response_metadata={
                    "model_name": self.model_name,
                    "finish_reason": finish_reason,
                    "seed": seed,
                    **({"repetition_stopped": True} if guard.stopped else {}),
                },
                chunk_position="last",
            )
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if _whole(kwargs):  # a constrained reply comes whole
            message = self._generate(messages, stop, **kwargs).generations[0].message
            yield _whole_chunk(message)
            return
        opts = self._options(stop, kwargs)
        with contextlib.closing(self._iter_chunks(messages, opts)) as chunks:
            for chunk in chunks:
                if run_manager is not None and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if _whole(kwargs):
            result = await asyncio.to_thread(self._generate, messages, stop, **kwargs)
            yield _whole_chunk(result.generations[0].message)
            return
        opts = self._options(stop, kwargs)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[ChatGenerationChunk | None, BaseException | None]] = (
            asyncio.Queue()
        )
        stopped = threading.Event()

        def put(item: tuple[ChatGenerationChunk | None, BaseException | None]) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            # Runs in a worker thread; the generator holds the lock and releases it on close.
            try:
                with contextlib.closing(self._iter_chunks(messages, opts)) as chunks:
                    for chunk in chunks:
                        if stopped.is_set():
                            return
                        put((chunk, None))
            except BaseException as exc:
                put((None, exc))
            else:
                put((None, None))

        worker = loop.run_in_executor(None, contextvars.copy_context().run, produce)
        try:
            while True:
                chunk, error = await queue.get()
                if error is not None:
                    raise error
                if chunk is None:
                    break
                if run_manager is not None and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            # The consumer may stop early: tell the worker, and wait until it has released
            # the model's lock (it checks after each token).
            stopped.set()
            await worker

    # -- N candidates in one batched pass -----------------------------------------------------

    def _sample_n(
        self, messages: LanguageModelInput, seeds: Sequence[int | None], options: dict[str, Any]
    ) -> list[AIMessage | Exception]:
        """Generate ``len(seeds)`` independent replies to ``messages`` in one batched pass.

        The prompt is decoded once and shared by all sequences; each sequence samples with its
        own seed (None draws a fresh one). ``options`` may override ``temperature``,
        ``top_p``, ``max_tokens`` and ``stop``. An invalid seed yields that element's
        ``ValueError``; a failure of the whole batch (e.g. a prompt longer than ``n_ctx``)
        raises.

        Every reply's ``response_metadata`` holds ``model_name``, ``finish_reason``,
        ``batched`` (True), ``batch_size``, ``seed``, ``prompt_eval_tokens`` (prompt tokens
        decoded for the whole batch: the prompt length, not N times it) and ``latency_s``
        (seconds from the call until that reply was complete).
        """
        started = time.perf_counter()
        opts = self._options(None, options)
        chat = to_chat(self._convert_input(messages).to_messages(), reader="the local model")
        results: list[AIMessage | Exception] = []
        valid: list[tuple[int, int]] = []  # (index in results, seed)
        for i, seed in enumerate(seeds):
            try:
                valid.append((i, check_seed(seed)))
                results.append(RuntimeError("This candidate was not generated."))
            except ValueError as exc:
                results.append(exc)
        if valid:
            replies = sample_batch(
                self._loaded,
                chat,
                [seed for _, seed in valid],
                opts,
                started=started,
                model_name=self.model_name,
            )
            for (i, _), reply in zip(valid, replies, strict=True):
                results[i] = reply
        return results


def _whole(kwargs: dict[str, Any]) -> bool:
    """A call whose reply is made whole (tool calls, a schema, logprobs), not token by token."""
    return bool(kwargs.get("tools")) or any(k in kwargs for k in _CONSTRAINED_OPTIONS)


def _whole_chunk(message: BaseMessage) -> ChatGenerationChunk:
    """A whole reply (tool calls included) as one chunk."""
    assert isinstance(message, AIMessage)
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=message.content,
            tool_call_chunks=[
                {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                for i, c in enumerate(message.tool_calls)
            ],
            usage_metadata=message.usage_metadata,
            response_metadata=message.response_metadata,
            chunk_position="last",
        )
    )
