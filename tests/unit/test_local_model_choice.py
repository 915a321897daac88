"""Choosing the embedded model and its decoding: packaged names, GGUF paths, the environment
default, repetition options in model specs, and `ask --model` without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion_graph.integrations.llama_cpp_models import (
    DEFAULT_MODEL,
    MODEL_ENV,
    PACKAGED_MODELS,
    default_model,
    packaged_model,
)
from fusion_graph.integrations.repeat_guard import RepeatGuard, repeated_sentences
from fusion_graph.models import ModelSpec


def test_the_environment_names_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert default_model() == DEFAULT_MODEL == "qwen2.5-coder-1.5b"
    monkeypatch.setenv(MODEL_ENV, "smollm2-135m")
    assert default_model() == "smollm2-135m"


def test_an_unknown_packaged_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as caught:
        packaged_model("gpt-5")
    assert all(key in str(caught.value) for key in PACKAGED_MODELS)


def test_every_packaged_model_pins_a_sha256_and_names_its_install() -> None:
    for model in PACKAGED_MODELS.values():
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.size > 0 and model.licence == "Apache-2.0"
        assert "pip install" in model.install


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("local:model=gpt-5", "neither a packaged model"),
        ("local:presence_penalty=0.5", "presence_penalty= is for openai and vllm"),
        ("local:repeat_penalty=0.9", "repeat_penalty must be >= 1"),
        ("openai:http://127.0.0.1:8000/v1:m:repeat_penalty=1.2", "for local and vllm"),
        ("openai:http://127.0.0.1:8000/v1:m:frequency_penalty=3", "between -2 and 2"),
        ("openai:http://127.0.0.1:8000/v1:m:model=x", "model= is for local models only"),
    ],
)
def test_bad_model_choices_are_refused_when_parsed(spec: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ModelSpec.parse(spec)


def test_repetition_options_parse_for_the_kinds_that_take_them(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    assert ModelSpec.parse(f"local:model={gguf},repeat_penalty=1.3").options == {
        "model": str(gguf),
        "repeat_penalty": 1.3,
    }
    remote = ModelSpec.parse(
        "vllm:http://127.0.0.1:8000/v1:m:repeat_penalty=1.1,presence_penalty=-1"
    )
    assert remote.options == {"repeat_penalty": 1.1, "presence_penalty": -1.0}


def test_ask_model_without_a_server_picks_an_embedded_model() -> None:
    from fusion_graph.cli.ask import ModelChoice
    from fusion_graph.cli.errors import CliError

    def choice(model: str) -> ModelChoice:
        return ModelChoice(
            model=model,
            base_url=None,
            api_key_env="OPENAI_API_KEY",
            temperature=0.8,
            max_tokens=16,
            timeout=None,
        )

    assert choice("smollm2-135m").spec().options == {"model": "smollm2-135m"}
    assert choice("local:model=smollm2-135m,seed=3").spec().options["seed"] == 3
    with pytest.raises(CliError, match="--base-url"):
        choice("Qwen/Qwen2.5-7B-Instruct").spec()


def test_an_inactive_guard_lets_a_refrain_through() -> None:
    text = "Row, row, row your boat. Row, row, row your boat. Row, row, row your boat."
    active, inactive = RepeatGuard(), RepeatGuard(active=False)
    shown = active.feed(text) + active.finish()
    assert active.stopped and shown == "Row, row, row your boat."
    assert inactive.feed(text) + inactive.finish() == text and not inactive.stopped
    assert repeated_sentences(text) == {"row row row your boat": 3}
