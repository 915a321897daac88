"""Unit tests for the repetition guard and the verdict helpers (WIP issue 15)."""

from __future__ import annotations

import math

from langchain_core.messages import AIMessage

from fusion_graph.integrations.repeat_guard import RepeatGuard, repeated_sentences
from fusion_graph.nodes.verdicts import expected_score


def feed_all(text: str, step: int = 3) -> tuple[str, RepeatGuard]:
    guard = RepeatGuard()
    shown = ""
    for i in range(0, len(text), step):
        shown += guard.feed(text[i : i + step])
        if guard.stopped:
            break
    return shown + guard.finish(), guard


def test_a_loop_ends_before_the_repeated_sentence_and_is_never_shown() -> None:
    loop = "Paris is lovely. It is a place where people meet. " * 5
    shown, guard = feed_all(loop)
    assert guard.stopped
    assert shown == "Paris is lovely. It is a place where people meet."
    assert repeated_sentences(shown) == {}


def test_text_without_repeats_passes_unchanged() -> None:
    text = "Paris is the capital. It is famous for the Eiffel Tower.\nYes. Yes."
    shown, guard = feed_all(text, step=1)
    assert not guard.stopped
    assert shown == text


def test_repeated_sentences_counts() -> None:
    assert repeated_sentences("A b c. A b c. A b c. Other one here.") == {"a b c": 3}


def _lp(p: float) -> float:
    return math.log(p)


def test_expected_score_weights_the_score_digits() -> None:
    content = [
        {"token": '{"score": ', "logprob": 0.0, "top_logprobs": []},
        {
            "token": "8",
            "logprob": _lp(0.5),
            "top_logprobs": [
                {"token": "8", "logprob": _lp(0.5)},
                {"token": "6", "logprob": _lp(0.5)},
            ],
        },
    ]
    reply = AIMessage(content='{"score": 8}', response_metadata={"logprobs": {"content": content}})
    assert expected_score(reply) == 7.0


def test_expected_score_splits_one_between_1_and_10() -> None:
    content = [
        {"token": '{"score":', "logprob": 0.0, "top_logprobs": []},
        {"token": "1", "logprob": _lp(1.0), "top_logprobs": [{"token": "1", "logprob": 0.0}]},
        {
            "token": "0",
            "logprob": _lp(0.75),
            "top_logprobs": [{"token": "0", "logprob": _lp(0.75)}],
        },
    ]
    reply = AIMessage(content='{"score":10}', response_metadata={"logprobs": {"content": content}})
    assert expected_score(reply) == 0.25 * 1 + 0.75 * 10


def test_no_logprobs_no_expected_score() -> None:
    assert expected_score(AIMessage(content='{"score": 3}')) is None
