"""Tests for mimo/tokenizer.py and the files training/train_tokenizer.py writes, against transformers."""

import json
import random
from pathlib import Path
from typing import Any

import pytest

from mimo.chat_template import ChatTemplate, normalize_messages
from mimo.tokenizer import IncrementalDetokenizer, Tokenizer
from training.dialogues import chat_dialogues, rendered_chat_texts, tool_dialogues
from training.tool_scenarios import TOOL_SCHEMAS
from training.train_tokenizer import MARKUP_TOKENS, SPECIAL_TOKENS, train_tokenizer, write_tokenizer_files

VOCAB_SIZE = 700
SAMPLES = [
    "Hello, world!  Two spaces, a tab\tand\nnewlines\n\n",
    "def f(x: int) -> int:\n    return x * 12345  # digits\n",
    " leading space and trailing space ",
    "Grüße aus Zürich, naïve café, 日本語のテキスト, emoji 🙂👍🏽 and e\u0301 (combining).",
    "<think>\nreason\n</think>\n\n<tool_call>\n<function=f>\n</function>\n</tool_call>",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]


def sample_texts() -> list[str]:
    docs = [json.__doc__ or "", random.__doc__ or ""]
    return [*rendered_chat_texts(ChatTemplate.default(), 150, seed=0), *docs]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(train_tokenizer(sample_texts(), VOCAB_SIZE), out, model_max_length=512)
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="session")
def hf(tokenizer_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def conversations() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]:
    """Hand-written edge cases plus generated dialogues (tools, reasoning, tool results, multi-turn)."""
    weather = TOOL_SCHEMAS["get_weather"]
    hand_written: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
        ([{"role": "user", "content": "Hi"}], None),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Zürich?"}]},
                {
                    "role": "assistant",
                    "content": "",
                    "reasoning_content": "Call get_weather.",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
                        },
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Bern"}},
                        },
                    ],
                },
                {"role": "tool", "content": '{"t": 3}'},
                {"role": "tool", "content": '{"t": 4}'},
                {
                    "role": "assistant",
                    "content": "3 and 4.",
                    "reasoning_content": None,
                    "reasoning": "Both came back.",
                },
                {"role": "user", "content": "Thanks!"},
            ],
            [weather],
        ),
    ]
    generated = tool_dialogues(6, seed=1) + chat_dialogues(3, seed=2)
    # transformers' templates take dict arguments; normalize_messages parses the OpenAI JSON strings.
    return hand_written + [(normalize_messages(d.messages), d.tools) for d in generated]


def test_special_tokens_have_fixed_single_ids(tok: Tokenizer) -> None:
    """Catches control or markup tokens split into pieces, or ids moving between tokenizer versions."""
    for expected_id, token in enumerate(SPECIAL_TOKENS + MARKUP_TOKENS):
        assert tok.token_id(token) == expected_id
        assert tok.encode(token) == [expected_id]
    assert tok.eos_token_ids == (2, 0)
    assert tok.vocab_size == VOCAB_SIZE
    with pytest.raises(KeyError):
        tok.token_id("<not a token>")


def test_round_trip_and_skipping_only_chatml_tokens(tok: Tokenizer) -> None:
    """Catches lossy byte-level decoding, or skip_special_tokens also dropping <think>/<tool_call> markup."""
    for text in SAMPLES:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode(SAMPLES[4])) == SAMPLES[4]
    assert tok.decode(tok.encode(SAMPLES[5])) == "user\nhi\n"


def test_incremental_detokenizer_equals_full_decode(tok: Tokenizer) -> None:
    """Catches streamed text that differs from the final text, or half UTF-8 characters sent as U+FFFD."""
    for skip in (True, False):
        for text in SAMPLES:
            ids = tok.encode(text)
            stream = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            pieces = [stream.push(token_id) for token_id in ids]
            pieces.append(stream.flush())
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in piece for piece in pieces)
    # Multi-byte characters really are split across byte tokens in this small vocabulary.
    assert len(tok.encode("🙂")) > 1


def test_incremental_detokenizer_flushes_an_incomplete_character(tok: Tokenizer) -> None:
    """Catches text silently lost when a stream stops inside a multi-byte character."""
    ids = tok.encode("a🙂")
    stream = IncrementalDetokenizer(tok)
    streamed = "".join(stream.push(token_id) for token_id in ids[:-1])
    assert streamed + stream.flush() == tok.decode(ids[:-1])
    assert streamed == "a"


def test_ids_and_decoding_match_transformers(tok: Tokenizer, hf: Any) -> None:
    """Catches tokenizer files that transformers reads differently (pre-tokenizer, added tokens, cleanup)."""
    texts = [*SAMPLES, *sample_texts()[:20]]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    assert hf.eos_token_id == tok.token_id("<|im_end|>")
    assert hf.pad_token_id == tok.token_id("<|endoftext|>")
    assert hf.bos_token is None


@pytest.mark.parametrize("enable_thinking", [None, False, True])
def test_chat_rendering_matches_transformers(tok: Tokenizer, hf: Any, enable_thinking: bool | None) -> None:
    """Catches a Jinja environment or message normalisation that drifts from apply_chat_template."""
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for messages, tools in conversations():
        for add_generation_prompt in (True, False):
            ours = tok.render_chat(messages, tools, add_generation_prompt, **kwargs)
            theirs = hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
            assert ours == theirs
            theirs_ids = hf.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                return_dict=False,
                **kwargs,
            )
            assert tok.encode_chat(messages, tools, add_generation_prompt, **kwargs) == list(theirs_ids)


def test_training_is_deterministic() -> None:
    """Catches nondeterministic merges, which would make the shipped tokenizer irreproducible."""
    texts = sample_texts()[:40]
    assert train_tokenizer(texts, 400).to_str() == train_tokenizer(texts, 400).to_str()


def test_missing_files_raise_errors_that_name_the_file(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Catches an opaque error from deep inside `tokenizers` when a checkpoint lacks its tokenizer."""
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer.from_dir(tmp_path)
