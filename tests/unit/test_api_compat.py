"""Clients of the official MiMo API over real HTTP with the `openai` client (the tiny model in
process): the top-level `thinking` switch, and sampling defaults from the checkpoint's
generation_config.json (explicit request values win; the spec's switch turns them off)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from cluster.cli.local_server import LocalServer
from cluster.serving.app import check_engine_fits
from cluster.serving.gateway_deployment import sampling_defaults
from cluster.spec import ClusterSpec, SpecError
from gateway.config import GatewayConfig
from mimo.generation_config import NO_DEFAULTS, SamplingDefaults, read_sampling_defaults
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "mimo-tiny"
MODEL = "mimo-tiny"
AUTHORS = {"temperature": 0.6, "top_p": 0.8, "top_k": 20, "max_new_tokens": 7, "do_sample": True}


@pytest.fixture(scope="module")
def with_defaults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its authors' sampling defaults in generation_config.json."""
    path = tmp_path_factory.mktemp("ckpt") / "mimo-tiny"
    shutil.copytree(TINY, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], **AUTHORS}))
    return path


def _serve(defaults: SamplingDefaults, default_thinking: bool = False) -> LocalServer:
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_dir(TINY)
    engine = Engine(load_model(TINY), tokenizer, EngineConfig(kv_cache_bytes=16 * 2**20, max_model_len=512))
    config = GatewayConfig(
        MODEL, max_model_len=512, sampling_defaults=defaults, default_thinking=default_thinking
    )
    return LocalServer.start(AsyncEngine(engine), tokenizer, config)


@pytest.fixture(scope="module")
def client(with_defaults: Path) -> Iterator[openai.OpenAI]:
    server = _serve(read_sampling_defaults(with_defaults))
    yield openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    server.stop()


def _say(client: openai.OpenAI, **kwargs: object) -> str:
    messages = [{"role": "user", "content": "Tell me a story about a river."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, seed=11, **kwargs)  # type: ignore[call-overload]
    return str(reply.choices[0].message.content) + f"|{reply.usage.completion_tokens}"


def test_generation_config_is_read_as_vllm_reads_it(with_defaults: Path) -> None:
    """Catches a defaults reader that takes do_sample or other keys, renames max_new_tokens wrong,
    or accepts a value of the wrong type."""
    assert read_sampling_defaults(with_defaults).present() == {
        "temperature": 0.6,
        "top_p": 0.8,
        "top_k": 20,
        "max_tokens": 7,
    }
    assert read_sampling_defaults(TINY) == NO_DEFAULTS  # the shipped file sets only eos and do_sample
    (with_defaults.parent / "bad").mkdir()
    (with_defaults.parent / "bad" / "generation_config.json").write_text('{"top_k": 1.5}')
    with pytest.raises(ValueError, match="top_k must be an integer"):
        read_sampling_defaults(with_defaults.parent / "bad")


def test_missing_fields_take_the_checkpoints_defaults_explicit_values_win(client: openai.OpenAI) -> None:
    """Catches a gateway that ignores generation_config.json (OpenAI's temperature 1.0 and no cap
    instead of the authors' values), or that lets the defaults override what a request says."""
    implicit = _say(client)
    assert implicit == _say(client, temperature=0.6, top_p=0.8, extra_body={"top_k": 20}, max_tokens=7)
    assert implicit.endswith("|7")  # max_new_tokens caps a request without max_tokens
    assert implicit != _say(client, temperature=1.0, top_p=1.0, extra_body={"top_k": 0}, max_tokens=7)
    assert _say(client, max_tokens=3).endswith("|3")  # an explicit max_tokens wins


def test_defaults_off_restore_openais(with_defaults: Path) -> None:
    """Catches `model.generation_config: none` still applying the checkpoint's values."""
    spec = ClusterSpec.from_dict({"model": {"path": str(with_defaults), "generation_config": "none"}})
    assert sampling_defaults(spec) == NO_DEFAULTS
    assert sampling_defaults(
        spec.model_copy(update={"model": spec.model.model_copy(update={"generation_config": "auto"})})
    ) == read_sampling_defaults(with_defaults)
    server = _serve(NO_DEFAULTS)
    try:
        off = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        cards = off.models.list().data
        assert cards[0].model_extra and cards[0].model_extra["sampling_defaults"] == {}
        assert _say(off, max_tokens=7) == _say(
            off, temperature=1.0, top_p=1.0, extra_body={"top_k": 0}, max_tokens=7
        )
    finally:
        server.stop()


def test_a_bad_generation_config_fails_at_the_spec(with_defaults: Path) -> None:
    """Catches a malformed generation_config.json failing every replica at start instead."""
    bad = with_defaults.parent / "bad-ckpt"
    shutil.copytree(with_defaults, bad)
    (bad / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(SpecError, match=r"model\.generation_config"):
        check_engine_fits(ClusterSpec.from_dict({"model": {"path": str(bad)}}))
    check_engine_fits(ClusterSpec.from_dict({"model": {"path": str(bad), "generation_config": "none"}}))


def _reasoning(reply: object) -> str | None:
    message = reply.choices[0].message  # type: ignore[attr-defined]
    return getattr(message, "reasoning_content", None) or (message.model_extra or {}).get("reasoning_content")


def test_thinking_switch_of_the_official_api(client: openai.OpenAI) -> None:
    """Catches a top-level `thinking` switch that is ignored (the client silently gets the other
    mode), and a contradiction with chat_template_kwargs.enable_thinking that is not refused."""
    messages = [{"role": "user", "content": "What is 17 times 23? Think step by step."}]

    def ask(**extra: object) -> object:
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=60, temperature=0, extra_body=extra
        )

    assert _reasoning(ask(thinking={"type": "enabled"}))
    assert not _reasoning(ask(thinking={"type": "disabled"}))
    agreed = ask(thinking={"type": "enabled"}, chat_template_kwargs={"enable_thinking": True})
    assert _reasoning(agreed) == _reasoning(ask(chat_template_kwargs={"enable_thinking": True}))
    with pytest.raises(openai.BadRequestError) as refused:
        ask(thinking={"type": "disabled"}, chat_template_kwargs={"enable_thinking": True})
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "thinking.type"
    assert "thinking.type" in error["message"] and "chat_template_kwargs.enable_thinking" in error["message"]
    for bad in ({"type": "auto"}, {"type": "enabled", "budget": 5}):
        with pytest.raises(openai.BadRequestError) as invalid:
            ask(thinking=bad)
        assert isinstance(invalid.value.body, dict) and invalid.value.body["param"].startswith("thinking")


def test_the_servers_default_mode_applies_when_the_request_is_silent() -> None:
    """Catches `gateway.default_thinking` being ignored for requests that say nothing."""
    server = _serve(NO_DEFAULTS, default_thinking=True)
    try:
        c = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "What is 17 times 23? Think step by step."}]
        silent = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0)
        off = c.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=60,
            temperature=0,
            extra_body={"thinking": {"type": "disabled"}},
        )
        assert _reasoning(silent) and not _reasoning(off)
    finally:
        server.stop()
