"""gateway/routing_prompt.py: the direct-streaming route chooser must hash exactly the tokens the
replica's API will give its engine, from nothing but the raw body."""

from __future__ import annotations

import json

import pytest

from cluster.spec import EMBEDDED_MODEL
from gateway.chat import render_chat
from gateway.routing_prompt import routing_prompt
from gateway.schemas import ChatCompletionRequest
from mimo.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_MODEL)


def test_chat_body_gives_the_rendered_prompt(tokenizer: Tokenizer) -> None:
    """Catches a chooser that hashes something else than the chat template's output (no prefix
    would ever match what the replica cached)."""
    body = {
        "model": "mimo-tiny",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        "max_tokens": 4,
    }
    expected = render_chat(ChatCompletionRequest.model_validate(body), tokenizer).prompt_token_ids
    assert routing_prompt(json.dumps(body).encode(), tokenizer) == expected
    assert len(expected) > 5


def test_completion_body_gives_its_first_prompt(tokenizer: Tokenizer) -> None:
    text = {"model": "mimo-tiny", "prompt": "def fib(n):"}
    assert routing_prompt(json.dumps(text).encode(), tokenizer) == tokenizer.encode("def fib(n):")
    ids = {"model": "mimo-tiny", "prompt": [[5, 6, 7], [8, 9]]}
    assert routing_prompt(json.dumps(ids).encode(), tokenizer) == [5, 6, 7]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"model": "mimo-tiny"}',
        b'{"model": "mimo-tiny", "messages": "hello"}',
        b'{"model": "mimo-tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}',
        b'{"model": "mimo-tiny", "prompt": []}',
    ],
)
def test_invalid_bodies_give_no_prompt(body: bytes, tokenizer: Tokenizer) -> None:
    """Catches a chooser that raises (HAProxy turns a failed route into a 503) instead of leaving
    the replica to answer the bad request with its proper 400."""
    assert routing_prompt(body, tokenizer) == []
