"""The base of chat models whose work blocks in this process (llama.cpp, vLLM): their async
methods run the sync path in a worker thread, and they make N samples in one call."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel

if TYPE_CHECKING:
    from collections.abc import Sequence

    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
    from langchain_core.language_models import LanguageModelInput
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import ChatResult

__all__ = ["BlockingChatModel"]


class BlockingChatModel(BaseChatModel):
    """A chat model that computes in this process and blocks while it does.

    A subclass implements ``_generate`` and ``_sample_n``; this class runs ``_generate`` in a
    worker thread for the async path (so the event loop is never blocked), and provides
    :meth:`sample_n` / :meth:`asample_n` (:class:`~fusion_graph.nodes.fanout.SupportsSampleN`).
    """

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def sample_n(
        self, messages: LanguageModelInput, *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        """``len(seeds)`` replies to ``messages`` (anything ``invoke`` accepts) in one call.

        ``kwargs`` are call options (``temperature``, ``top_p``, ``max_tokens``, ``stop``); the
        seeds are given per candidate (None draws a fresh one), never as ``seed=``. How the
        model batches the samples, and what each reply's ``response_metadata`` reports, is
        described by the subclass's ``_sample_n``.

        Raises:
            TypeError: ``seed=`` was passed (or an option the model does not take).
        """
        if "seed" in kwargs:
            msg = "sample_n takes one seed per candidate; pass seeds=[...] instead of seed=."
            raise TypeError(msg)
        return self._sample_n(messages, seeds, kwargs)

    async def asample_n(
        self, messages: LanguageModelInput, *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        """Async :meth:`sample_n`: runs in a worker thread, never blocking the event loop."""
        return await asyncio.to_thread(self.sample_n, messages, seeds=seeds, **kwargs)

    @abstractmethod
    def _sample_n(
        self, messages: LanguageModelInput, seeds: Sequence[int | None], options: dict[str, Any]
    ) -> list[AIMessage | Exception]:
        """The replies of :meth:`sample_n` (``options`` holds no ``seed``)."""
