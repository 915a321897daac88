"""The model-name grammar and the ``fusion_graph`` request object (no server)."""

from __future__ import annotations

import pytest

from fusion_graph.serve import ServeLimits, StrategyError, parse_model_name
from fusion_graph.serve.strategy import StrategyOverrides, choose_strategy


@pytest.mark.parametrize(
    ("model", "kind", "n", "selector", "critic", "upstream"),
    [
        ("fusion-4/smollm2", "fusion", 4, None, False, "smollm2"),
        ("fusion-2-critic/smollm2", "fusion", 2, None, True, "smollm2"),
        (
            "bon-8-judge/Qwen/Qwen2.5-7B-Instruct",
            "best_of_n",
            8,
            "judge",
            False,
            "Qwen/Qwen2.5-7B-Instruct",
        ),
        ("bon-8/m", "best_of_n", 8, "judge", False, "m"),
        ("bon-4-vote/m", "best_of_n", 4, "vote", False, "m"),
        ("bon-4-pairwise-critic/m", "best_of_n", 4, "pairwise", True, "m"),
        ("bon-3-critic/m", "best_of_n", 3, "judge", True, "m"),
        ("vote-5/m", "best_of_n", 5, "vote", False, "m"),
        ("smollm2", "pass_through", 1, None, False, "smollm2"),
        ("Qwen/Qwen2.5-7B-Instruct", "pass_through", 1, None, False, "Qwen/Qwen2.5-7B-Instruct"),
        ("fusionista/x", "pass_through", 1, None, False, "fusionista/x"),
    ],
)
def test_model_names_parse(
    model: str, kind: str, n: int, selector: str | None, critic: bool, upstream: str
) -> None:
    choice = parse_model_name(model)
    assert (choice.kind, choice.n, choice.selector, choice.critic) == (kind, n, selector, critic)
    assert choice.upstream_model == upstream


@pytest.mark.parametrize(
    ("model", "canonical"),
    [
        ("bon-8/m", "bon-8-judge/m"),
        ("vote-5/m", "bon-5-vote/m"),
        ("fusion-2-critic/m", "fusion-2-critic/m"),
        ("m", "m"),
    ],
)
def test_the_response_names_what_ran(model: str, canonical: str) -> None:
    assert parse_model_name(model).model_name == canonical


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("fusion-x/m", "unknown strategy"),
        ("bon-4-best/m", "unknown selector 'best'"),
        ("vote-/m", "unknown strategy"),
        ("fusion-4/", "no upstream model"),
        ("", "empty"),
    ],
)
def test_bad_model_names_are_errors_on_the_model_param(model: str, words: str) -> None:
    with pytest.raises(StrategyError, match=words) as caught:
        parse_model_name(model)
    assert caught.value.param == "model"


def test_the_request_object_overrides_the_name() -> None:
    choice = choose_strategy(
        "fusion-4/m", StrategyOverrides(strategy="best_of_n", n=2, selector="vote"), max_n=8
    )
    assert (choice.kind, choice.n, choice.selector) == ("best_of_n", 2, "vote")


def test_the_request_object_on_a_plain_name_uses_the_default_strategy() -> None:
    choice = choose_strategy("m", StrategyOverrides(n=3, critic=True), max_n=8)
    assert (choice.kind, choice.n, choice.critic) == ("fusion", 3, True)
    bon = choose_strategy("m", StrategyOverrides(strategy="best_of_n"), max_n=8, default_n=5)
    assert (bon.kind, bon.n, bon.selector) == ("best_of_n", 5, "judge")


def test_strategy_none_passes_through() -> None:
    choice = choose_strategy("fusion-4/m", StrategyOverrides(strategy="none"), max_n=8)
    assert choice.kind == "pass_through"
    assert choice.upstream_model == "m"


@pytest.mark.parametrize(
    ("model", "overrides", "param"),
    [
        ("fusion-9/m", None, "model"),
        ("fusion-0/m", None, "model"),
        ("m", StrategyOverrides(n=9), "fusion_graph.n"),
        ("m", StrategyOverrides(strategy="majority"), "fusion_graph.strategy"),
        ("m", StrategyOverrides(selector="best"), "fusion_graph.selector"),
    ],
)
def test_out_of_range_or_unknown_choices_name_their_param(
    model: str, overrides: StrategyOverrides | None, param: str
) -> None:
    with pytest.raises(StrategyError) as caught:
        choose_strategy(model, overrides, max_n=8)
    assert caught.value.param == param


def test_limits_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="default_n"):
        ServeLimits(max_n=2, default_n=4)
    with pytest.raises(ValueError, match="max_in_flight"):
        ServeLimits(max_in_flight=0)
