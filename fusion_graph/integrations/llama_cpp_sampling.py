"""How the embedded model samples: a call's options, the seeds, the room a prompt leaves in the
context, and the sampling settings both decoding paths (one reply, N batched replies) share."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fusion_graph.integrations.llama_cpp_loader import LoadedModel

__all__ = [
    "MAX_SEED",
    "MIN_P",
    "REPEAT_LAST_N",
    "TOP_K",
    "FinishReason",
    "SamplingOptions",
    "check_seed",
    "fresh_seed",
    "room",
]

# llama-cpp-python's own sampling defaults (create_chat_completion); the batched path uses the
# same chain so both paths draw from the same distribution.
TOP_K = 40
MIN_P = 0.05
# What llama-cpp-python passes as the penalty window. Its binding still declares llama.cpp's
# old (n_vocab, last_n, ...) signature, so llama.cpp reads n_vocab as the window: the penalty
# covers the whole reply in both decoders.
REPEAT_LAST_N = 64
MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "pick a random seed" sentinel.

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingOptions:
    """The options of one call, checked."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    stop: list[str]
    repeat_penalty: float = 1.0
    stop_repeats: bool = True
    """End a reply before a sentence comes round again (:class:`RepeatGuard`)."""


def fresh_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def check_seed(seed: object) -> int:
    """A usable llama.cpp seed; ``None`` draws a fresh random one."""
    if seed is None:
        return fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        msg = f"A seed must be an int from 0 to {MAX_SEED} or None, not {seed!r}."
        raise ValueError(msg)
    return seed


def room(n_prompt: int, max_tokens: int, n_ctx: int) -> int:
    """Tokens that may be generated after an ``n_prompt``-token prompt; raise if none."""
    if n_prompt >= n_ctx:
        msg = (
            f"The prompt is {n_prompt} tokens long but the local model's context holds "
            f"{n_ctx} tokens; shorten the messages or create ChatLocalModel with a larger "
            "n_ctx."
        )
        raise ValueError(msg)
    return min(max_tokens, n_ctx - n_prompt)


def chat_completion(
    entry: LoadedModel,
    chat: list[dict[str, str]],
    opts: SamplingOptions,
    seed: int,
    **extra: Any,
) -> tuple[int, Any]:
    """The prompt's token count and one llama.cpp ``create_chat_completion`` (a result, or a
    chunk iterator with ``stream=True``) with our sampling chain and room for the reply;
    ``extra`` adds ``stop``, ``stream`` or ``response_format``. The caller holds the lock."""
    n_prompt = len(entry.prompt_tokens(chat))
    # llama-cpp-python keeps the last prompt's KV and decodes only what differs from it; a
    # prompt decoded in other pieces gives slightly other logits, so the same call with the
    # same seed would answer differently after a different previous call. Decode it whole.
    entry.llama.reset()
    return n_prompt, entry.llama.create_chat_completion(
        messages=chat,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=TOP_K,
        min_p=MIN_P,
        repeat_penalty=opts.repeat_penalty,
        max_tokens=room(n_prompt, opts.max_tokens, entry.n_ctx),
        seed=seed,
        **extra,
    )
