"""Loading the embedded model: llama-cpp-python (imported lazily) and the process-wide cache
of loaded models with one lock per model file.

Thread safety
    A ``llama_cpp.Llama`` is not thread safe: two threads decoding with one object crash the
    process (segfault). Loaded models therefore live in a process-wide cache keyed by
    ``(model file, n_ctx, n_threads)``, and every model file has exactly one lock. Every call
    into llama.cpp (tokenising, decoding, sampling, loading) holds that lock, so any number of
    :class:`~fusion_graph.integrations.llama_cpp.ChatLocalModel` instances, threads,
    ``Runnable.batch`` calls, LangGraph ``Send`` fan-outs and ``ainvoke`` coroutines can share
    a model; their calls simply run one after another.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "INSTALL_HINT",
    "LoadedModel",
    "ModelLock",
    "cpu_count",
    "import_llama_cpp",
    "load_model",
]

INSTALL_HINT = "install it with `pip install 'fusion-graph[local]'`"


def import_llama_cpp() -> tuple[Any, Any, Any]:
    """Import llama-cpp-python lazily: (package, low-level bindings, internals)."""
    try:
        import llama_cpp
        import llama_cpp._internals as internals
        import llama_cpp.llama_cpp as low_level
    except ImportError as exc:
        msg = f"The embedded local model needs llama-cpp-python; {INSTALL_HINT}."
        raise ImportError(msg) from exc
    return llama_cpp, low_level, internals


def cpu_count() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class ModelLock:
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
class LoadedModel:
    """One loaded ``Llama`` plus the batched context sharing its weights. Use under ``lock``.

    ``batch_ctx`` (and its sizes) is made and grown by
    :mod:`~fusion_graph.integrations.llama_cpp_batch` on the first batched call.
    """

    path: str
    n_ctx: int
    n_threads: int
    llama: Any
    lock: ModelLock
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


# _REGISTRY_LOCK guards _FILE_LOCKS; a model is loaded under its file's lock, and a loaded
# entry is found without any lock (a dict read).
_REGISTRY_LOCK = threading.Lock()
_FILE_LOCKS: dict[str, ModelLock] = {}
_MODELS: dict[tuple[str, int, int], LoadedModel] = {}


def load_model(path: str, n_ctx: int, n_threads: int) -> LoadedModel:
    """Return the cached model for this key, loading it (under the file's lock) on first use."""
    key = (path, n_ctx, n_threads)
    entry = _MODELS.get(key)
    if entry is not None:
        return entry
    with _REGISTRY_LOCK:
        lock = _FILE_LOCKS.setdefault(path, ModelLock())
    llama_cpp, _, _ = import_llama_cpp()
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
        entry = LoadedModel(
            path=path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            llama=llama,
            lock=lock,
            formatter=formatter,
        )
        _MODELS[key] = entry
        return entry
