"""Batched decoding in the embedded model: N replies to one prompt in one llama.cpp context.

N candidates made one after another cost N * max_tokens one-token ``llama_decode`` calls,
which leave the CPU underused. :func:`sample_batch` (behind ``ChatLocalModel.sample_n``)
instead formats the prompt with the GGUF chat template (exactly as ``create_chat_completion``
does), decodes it once into sequence 0 of a second llama.cpp context that shares the loaded
weights (``n_seq_max >= N``, unified KV cache sized ``prompt + N * max_tokens``), copies that
KV cache to sequences 1..N-1 with ``llama_memory_seq_cp``, and then decodes one token per
unfinished sequence per step in a single ``llama_decode`` batch. Each sequence has its own
sampler chain (top-k, top-p, min-p, temperature, then ``dist`` seeded with that candidate's
seed), so the N samples are independent and reproducible. The batched context is used under
the same per-file lock as the model.
"""

from __future__ import annotations

import codecs
import time
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage

from fusion_graph.integrations.llama_cpp_loader import LoadedModel, import_llama_cpp
from fusion_graph.integrations.llama_cpp_sampling import (
    MIN_P,
    REPEAT_LAST_N,
    TOP_K,
    FinishReason,
    SamplingOptions,
    room,
)
from fusion_graph.integrations.repeat_guard import RepeatGuard
from fusion_graph.integrations.usage import token_usage
from fusion_graph.runtime import CallStopped, stop_requested

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["sample_batch"]

# Tokens per llama_decode call while evaluating a prompt.
_N_BATCH = 512
# KV cells of the batched context are allocated in steps of this many tokens.
_CTX_STEP = 256


def sample_batch(
    load: Callable[[], LoadedModel],
    chat: list[dict[str, str]],
    seeds: list[int],
    opts: SamplingOptions,
    *,
    started: float,
    model_name: str,
    grammar: str | None = None,
    top_logprobs: int | None = None,
) -> list[AIMessage | Exception]:
    """One reply to ``chat`` per seed, decoded as one batch in the model ``load`` returns (it is
    called once the batch size is known to fit); ``started`` is the call's
    ``time.perf_counter()``, the origin of each reply's ``latency_s``.

    ``grammar`` (GBNF, root rule ``root``) constrains every reply; with ``top_logprobs`` each
    reply's ``response_metadata["logprobs"]`` holds, in the OpenAI format, every generated
    token's log-probability and the ``top_logprobs`` most likely tokens at its position (from
    the model's own distribution, before penalties, grammar and temperature). Unconstrained
    replies end before a sentence that repeats (:class:`RepeatGuard`).

    A reply that cannot be built is that element's exception; a failure of the whole batch
    (a prompt longer than the context, a failed ``llama_decode``) raises.
    """
    _, ll, _ = import_llama_cpp()
    n = len(seeds)
    if n > int(ll.llama_max_parallel_sequences()):
        msg = (
            f"llama.cpp batches at most {ll.llama_max_parallel_sequences()} sequences; "
            f"ask sample_n for fewer than {n} candidates at a time."
        )
        raise ValueError(msg)
    entry = load()
    stop = [s.encode("utf-8") for s in opts.stop if s]
    with entry.lock:
        llama = entry.llama
        prompt = entry.prompt_tokens(chat)
        n_prompt = len(prompt)
        if n_prompt == 0:
            msg = "The chat template produced an empty prompt; send at least one message."
            raise ValueError(msg)
        max_new = room(n_prompt, opts.max_tokens, entry.n_ctx)
        ctx = _batch_context(entry, n_seq_max=n, n_ctx=n_prompt + n * max_new).ctx
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
                samplers.append(_sampler_chain(ll, opts, seed, grammar=grammar, vocab=vocab))
            guarded = grammar is None and opts.stop_repeats
            guards = [RepeatGuard() if guarded else None for _ in range(n)]
            decoders = [codecs.getincrementaldecoder("utf-8")("ignore") for _ in range(n)]
            logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
            n_vocab = int(ll.llama_vocab_n_tokens(vocab))
            # 4. One token per live sequence per llama_decode.
            tokens: list[list[int]] = [[] for _ in range(n)]
            pieces: list[bytearray] = [bytearray() for _ in range(n)]
            finish: list[FinishReason] = ["length"] * n
            latency = [0.0] * n
            cut: list[bytes | None] = [None] * n
            logit_index = dict.fromkeys(range(n), (n_prompt - 1) % _N_BATCH)
            live = list(range(n))
            while live:
                if stop_requested():  # cancelled or timed out: free the model now
                    msg = "the local model stopped: the call was cancelled or timed out"
                    raise CallStopped(msg)
                still_live: list[int] = []
                for seq in live:
                    if top_logprobs is not None:
                        logp = _log_softmax(ll, ctx, logit_index[seq], n_vocab)
                    token = int(ll.llama_sampler_sample(samplers[seq], ctx, logit_index[seq]))
                    if ll.llama_vocab_is_eog(vocab, token):
                        finish[seq] = "stop"
                        continue
                    tokens[seq].append(token)
                    if top_logprobs is not None:
                        logprobs[seq].append(_token_logprob(llama, token, logp, top_logprobs))
                    guard = guards[seq]
                    if stop or guard is not None:
                        token_bytes = llama.detokenize([token])
                        pieces[seq] += token_bytes
                    if stop:
                        cut[seq] = _cut_at_stop(bytes(pieces[seq]), stop)
                        if cut[seq] is not None:
                            finish[seq] = "stop"
                            continue
                    if guard is not None:
                        guard.feed(decoders[seq].decode(token_bytes))
                        if guard.stopped:
                            cut[seq] = guard.text.encode("utf-8")
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
                    metadata: dict[str, Any] = {
                        "model_name": model_name,
                        "finish_reason": finish[seq],
                        "batched": True,
                        "batch_size": n,
                        "seed": seeds[seq],
                        "prompt_eval_tokens": prompt_eval_tokens,
                        "latency_s": latency[seq],
                    }
                    guard = guards[seq]
                    if guard is not None and guard.stopped:
                        metadata["repetition_stopped"] = True
                    if top_logprobs is not None:
                        metadata["logprobs"] = {"content": logprobs[seq]}
                    replies.append(
                        AIMessage(
                            content=raw.decode("utf-8", errors="ignore"),
                            usage_metadata=token_usage(n_prompt, len(tokens[seq])),
                            response_metadata=metadata,
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


def _sampler_chain(
    ll: Any, opts: SamplingOptions, seed: int, *, grammar: str | None, vocab: Any
) -> Any:
    """The sampler chain create_chat_completion would build, seeded with ``seed``."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    if opts.repeat_penalty != 1.0:
        # As llama-cpp-python's own sampler calls it: its binding still declares the old
        # (n_vocab, last_n, ...) signature, which llama.cpp reads as last_n = n_vocab.
        n_vocab = int(ll.llama_vocab_n_tokens(vocab))
        penalties = ll.llama_sampler_init_penalties(
            n_vocab, REPEAT_LAST_N, opts.repeat_penalty, 0.0, 0.0
        )
        ll.llama_sampler_chain_add(chain, penalties)
    if grammar is not None:
        constrained = ll.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not constrained:
            ll.llama_sampler_free(chain)
            msg = "llama.cpp could not parse the grammar of this reply's JSON schema."
            raise ValueError(msg)
        ll.llama_sampler_chain_add(chain, constrained)
    if opts.temperature == 0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        return chain
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(TOP_K))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(opts.top_p, 1))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(MIN_P, 1))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(opts.temperature))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
    return chain


def _log_softmax(ll: Any, ctx: Any, index: int, n_vocab: int) -> Any:
    """The log-probabilities of every next token at logit row ``index``."""
    import numpy as np

    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _token_logprob(llama: Any, token: int, logp: Any, k: int) -> dict[str, Any]:
    """One entry of an OpenAI-format ``logprobs.content`` list: the token, its log-probability
    and the ``k`` most likely tokens at its position."""
    import numpy as np

    def text(t: int) -> str:
        return bytes(llama.detokenize([t])).decode("utf-8", errors="ignore")

    k = min(k, len(logp))
    best = np.argpartition(-logp, k - 1)[:k] if k else np.array([], dtype=int)
    best = best[np.argsort(-logp[best])]
    return {
        "token": text(token),
        "logprob": float(logp[token]),
        "top_logprobs": [{"token": text(int(t)), "logprob": float(logp[t])} for t in best],
    }


def _decode(ll: Any, ctx: Any, batch: Any) -> None:
    code = int(ll.llama_decode(ctx, batch))
    if code != 0:
        msg = (
            f"llama.cpp could not decode the batch (llama_decode returned {code}); "
            "ask for fewer candidates or fewer max_tokens."
        )
        raise RuntimeError(msg)


def _cut_at_stop(text: bytes, stop: list[bytes]) -> bytes | None:
    """``text`` up to the earliest stop sequence, or None when there is none."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else None


def _batch_context(entry: LoadedModel, n_seq_max: int, n_ctx: int) -> Any:
    """``entry``'s batched llama_context, recreated larger when it cannot hold this request."""
    if entry.batch_ctx is not None and (
        entry.batch_n_seq_max >= n_seq_max and entry.batch_n_ctx >= n_ctx
    ):
        return entry.batch_ctx
    _, low_level, internals = import_llama_cpp()
    n_seq_max = max(n_seq_max, entry.batch_n_seq_max)
    n_ctx = max(n_ctx, entry.batch_n_ctx)
    n_ctx = -(-n_ctx // _CTX_STEP) * _CTX_STEP
    if entry.batch_ctx is not None:
        entry.batch_ctx.close()
        entry.batch_ctx, entry.batch_n_ctx, entry.batch_n_seq_max = None, 0, 0
    params = low_level.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = _N_BATCH
    params.n_ubatch = _N_BATCH
    params.n_seq_max = n_seq_max
    params.kv_unified = True  # sequences share the prompt's KV cells
    params.n_threads = entry.n_threads
    params.n_threads_batch = entry.n_threads
    params.no_perf = True
    # internals.LlamaContext frees the context before the model it borrows is freed.
    ctx = internals.LlamaContext(model=entry.llama._model, params=params, verbose=False)
    entry.batch_ctx = ctx
    entry.batch_n_ctx = int(low_level.llama_n_ctx(ctx.ctx))
    entry.batch_n_seq_max = int(low_level.llama_n_seq_max(ctx.ctx))
    return ctx
