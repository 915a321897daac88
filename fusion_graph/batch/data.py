"""Prompt files for the batch commands: JSONL or CSV in, :class:`PromptItem` out.

A prompt file has one prompt per JSONL line (an object) or per CSV row (with a header).
Columns (names configurable):

* ``prompt`` (required): the user message.
* ``id`` (optional): a stable id; default the prompt's SHA-256 (``input_hash``).
* ``language_code`` (optional): passed through to the synthetic data rows.
* ``reference`` (optional, evaluation): the right answer, a string or (JSONL) a list of
  acceptable answers; in CSV, alternatives are separated by ``|``.

Every other column is kept in :attr:`PromptItem.extra`. Every model of a job is sent
:func:`prompt_messages`, with :func:`prompt_config` (the prompt's id and input hash in the
metadata, which the candidate store is keyed by).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel, ConfigDict, Field

from fusion_graph.messages import message_text

BUILTIN = "builtin"
"""The name that selects the built-in evaluation set."""
PROMPT_ID_KEY = "fusion_graph_prompt_id"
"""Config metadata key holding the prompt id of a batch job's model calls."""
INPUT_HASH_KEY = "fusion_graph_input_hash"
"""Config metadata key holding the SHA-256 of the prompt text (:attr:`PromptItem.input_hash`)."""


class PromptItem(BaseModel):
    """One prompt of a batch job."""

    model_config = ConfigDict(frozen=True)

    id: str
    """Stable id: the file's ``id`` column, else :attr:`input_hash`."""
    prompt: str
    """The user message sent to every model."""
    input_hash: str
    """SHA-256 (hex) of the prompt text."""
    language_code: str | None = None
    """The prompt's language, when the file gives one."""
    references: tuple[str, ...] = ()
    """Acceptable answers (evaluation); empty when the file gives none."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Other columns of the input row, untouched."""
    line: int = 0
    """1-based line (JSONL) or row (CSV, header excluded) it came from."""


def input_hash(prompt: str) -> str:
    """SHA-256 of the prompt text (UTF-8), hex: the paper's per-row input hash."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def prompt_messages(item: PromptItem) -> list[BaseMessage]:
    """What every model is sent for a prompt: the prompt as one user message."""
    return [HumanMessage(item.prompt)]


def prompt_config(item: PromptItem, *, run_name: str) -> RunnableConfig:
    """The config of a prompt's model calls: its id and input hash in the metadata."""
    metadata = {PROMPT_ID_KEY: item.id, INPUT_HASH_KEY: item.input_hash}
    return {"metadata": metadata, "run_name": run_name}


def conversation_hash(messages: Sequence[BaseMessage]) -> str:
    """The input hash of a conversation: a lone user message's is its prompt's
    :func:`input_hash`."""
    if len(messages) == 1 and isinstance(messages[0], HumanMessage):
        return input_hash(message_text(messages[0]))
    turns = [[m.type, message_text(m)] for m in messages]
    return input_hash(json.dumps(turns, ensure_ascii=False))


@dataclass(frozen=True, kw_only=True)
class Columns:
    """Which columns of the input file hold what."""

    prompt: str = "prompt"
    id: str = "id"
    reference: str = "reference"
    language: str = "language_code"


@dataclass(frozen=True, kw_only=True)
class PromptSet:
    """The prompts of a file, deduplicated by id (first occurrence kept)."""

    items: list[PromptItem]
    duplicates: int
    """Rows skipped because an earlier row had the same id and prompt."""
    source: str
    """Where they came from (a path, or ``builtin``)."""


def builtin_eval_set() -> Path:
    """Path of the built-in evaluation set (short questions with reference answers)."""
    return Path(str(resources.files("fusion_graph.batch").joinpath("data/eval_set.jsonl")))


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            for number, row in enumerate(reader, start=1):
                record: dict[str, Any] = {k: v for k, v in row.items() if k is not None}
                yield number, record
        return
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                msg = f"{path}:{number}: not valid JSON ({exc.msg})"
                raise ValueError(msg) from None
            if not isinstance(value, dict):
                msg = f"{path}:{number}: expected a JSON object, got {type(value).__name__}"
                raise ValueError(msg)
            yield number, value


def _references(value: Any, *, csv_style: bool) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, list):
        return tuple(str(v).strip() for v in value if str(v).strip())
    text = str(value)
    parts = text.split("|") if csv_style else [text]
    return tuple(p.strip() for p in parts if p.strip())


def read_prompts(path: Path | str, *, columns: Columns | None = None) -> PromptSet:
    """Read a JSONL / CSV / TSV prompt file (or ``"builtin"``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a row has no prompt, bad JSON, or an id reused for another prompt.
    """
    cols = columns or Columns()
    source = str(path)
    file = builtin_eval_set() if source == BUILTIN else Path(path)
    if not file.is_file():
        msg = f"prompt file {file} does not exist"
        raise FileNotFoundError(msg)
    csv_style = file.suffix.lower() in (".csv", ".tsv")
    items: list[PromptItem] = []
    seen: dict[str, PromptItem] = {}
    duplicates = 0
    known = {cols.prompt, cols.id, cols.reference, cols.language}
    for number, record in _records(file):
        prompt = record.get(cols.prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            msg = f"{file}:{number}: no {cols.prompt!r} text (columns: {sorted(record)})"
            raise ValueError(msg)
        digest = input_hash(prompt)
        raw_id = record.get(cols.id)
        item_id = str(raw_id).strip() if raw_id not in (None, "") else digest
        language = record.get(cols.language)
        item = PromptItem(
            id=item_id,
            prompt=prompt,
            input_hash=digest,
            language_code=str(language) if language not in (None, "") else None,
            references=_references(record.get(cols.reference), csv_style=csv_style),
            extra={k: v for k, v in record.items() if k not in known},
            line=number,
        )
        earlier = seen.get(item_id)
        if earlier is not None:
            if earlier.input_hash != digest:
                msg = (
                    f"{file}:{number}: id {item_id!r} is already used by line {earlier.line} "
                    "for a different prompt; ids must be unique"
                )
                raise ValueError(msg)
            duplicates += 1
            continue
        seen[item_id] = item
        items.append(item)
    return PromptSet(items=items, duplicates=duplicates, source=source)


def select_items(
    items: Iterable[PromptItem], *, limit: int | None = None, shard: tuple[int, int] | None = None
) -> list[PromptItem]:
    """The items of one shard (``(i, k)``: ids whose hash is ``i`` mod ``k``), then the
    first ``limit`` of them."""
    chosen = list(items)
    if shard is not None:
        index, count = shard
        chosen = [
            it
            for it in chosen
            if int(hashlib.sha256(it.id.encode("utf-8")).hexdigest()[:12], 16) % count == index
        ]
    if limit is not None:
        chosen = chosen[:limit]
    return chosen


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/k"`` (0 <= i < k) as ``(i, k)``."""
    try:
        left, right = text.split("/")
        index, count = int(left), int(right)
    except ValueError:
        msg = f"--shard takes I/K, e.g. 0/4 (shard 0 of 4), not {text!r}"
        raise ValueError(msg) from None
    if count < 1 or not 0 <= index < count:
        msg = f"--shard I/K needs 0 <= I < K, got {text!r}"
        raise ValueError(msg)
    return index, count
