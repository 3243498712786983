"""MiMo tokenizer: a `tokenizers` BPE plus the chat template, without transformers.

Reads a hub-style directory (`tokenizer.json`, `tokenizer_config.json`) and gives the engine and gateway
what they need: plain encode/decode, chat rendering, EOS ids, and an incremental detokenizer for
streaming that never emits half of a UTF-8 character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from mimo.chat_template import ChatTemplate, Message, Tool

# ChatML control tokens: decode(skip_special_tokens=True) drops these and only these, so <think> and
# <tool_call> stay in the text for the reasoning and tool-call parsers.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Lossy UTF-8 decoding ends with this character while a multi-byte character is still incomplete.
_REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


class Tokenizer:
    """Byte-level BPE tokenizer with the ChatML chat template of a MiMo checkpoint."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: ChatTemplate) -> None:
        self._backend = backend
        self.chat_template = chat_template
        missing = [token for token in (IM_START, IM_END) if backend.token_to_id(token) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the ChatML tokens {missing}")
        self._control_ids = frozenset(
            token_id for token in CONTROL_TOKENS if (token_id := backend.token_to_id(token)) is not None
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Loads `tokenizer.json` and the chat template (`chat_template.jinja` or `tokenizer_config.json`)."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_file}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        # transformers prefers a standalone chat_template.jinja over the config's key; so do we.
        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            config_file = directory / "tokenizer_config.json"
            configured = _read_json(config_file).get("chat_template")
            if not isinstance(configured, str):
                raise ValueError(f"{config_file} has no string 'chat_template'")
            template = configured
        return cls(backend, ChatTemplate(template))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: `<|im_end|>` (end of turn) and `<|endoftext|>` where present."""
        return tuple(
            token_id
            for token in (IM_END, ENDOFTEXT)
            if (token_id := self._backend.token_to_id(token)) is not None
        )

    def token_id(self, token: str) -> int:
        """The id of one token string; `KeyError` if the vocabulary lacks it."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS; control tokens written in the text become their single ids."""
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; `skip_special_tokens` drops the ChatML control tokens only."""
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id not in self._control_ids]
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def render_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The chat prompt text, identical to transformers' `apply_chat_template(..., tokenize=False)`."""
        return self.chat_template.render(messages, tools, add_generation_prompt, **template_kwargs)

    def encode_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of `render_chat(...)`."""
        return self.encode(self.render_chat(messages, tools, add_generation_prompt, **template_kwargs))


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation equals `decode(all_ids)`.

    Byte-level tokens can split a multi-byte character; such a tail decodes to U+FFFD and is held back
    until a later token completes it. Once the pending ids decode cleanly they are dropped, because
    lossy UTF-8 decoding restarts cleanly at a character boundary, so each step decodes only a few ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._pending_ids: list[int] = []

    def push(self, token_id: int) -> str:
        """Adds one token id; returns the newly completed text (often "", never half a character)."""
        self._pending_ids.append(token_id)
        text = self._tokenizer.decode(self._pending_ids, self._skip_special_tokens)
        if text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._pending_ids.clear()
        return text

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character decodes to U+FFFD)."""
        text = self._tokenizer.decode(self._pending_ids, self._skip_special_tokens)
        self._pending_ids.clear()
        return text
