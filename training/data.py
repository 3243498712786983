"""Token streams for training the tiny model: documentation/source text and rendered chats.

Text windows start anywhere in the concatenated documents; chat windows start at a conversation's
first token (conversations packed back to back), so the model often sees a whole tool-use exchange
from its system prompt on. Held-out documents and conversations are split off before tokenizing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mimo.tokenizer import Tokenizer
from training.corpus import load_corpus
from training.dialogues import rendered_chat_texts

HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class TokenStream:
    tokens: list[int]
    starts: list[int]  # index of each document's first token

    @staticmethod
    def from_docs(docs: list[list[int]], separator: int) -> TokenStream:
        tokens: list[int] = []
        starts = []
        for doc in docs:
            starts.append(len(tokens))
            tokens.extend(doc)
            tokens.append(separator)
        return TokenStream(tokens, starts)


@dataclass(frozen=True)
class TokenData:
    text: dict[str, TokenStream]  # "train" / "heldout"
    chat: dict[str, TokenStream]

    def text_window(self, split: str, length: int, rng: random.Random) -> list[int]:
        tokens = self.text[split].tokens
        start = rng.randrange(0, len(tokens) - length)
        return tokens[start : start + length]

    def chat_window(self, split: str, length: int, rng: random.Random) -> list[int]:
        stream = self.chat[split]
        start = stream.starts[rng.randrange(len(stream.starts))]
        window = stream.tokens[start : start + length]
        if len(window) < length:  # wrap to the stream's start rather than pad
            window += stream.tokens[: length - len(window)]
        return window

    def num_tokens(self) -> dict[str, int]:
        return {
            f"{kind}_{split}": len(streams[split].tokens)
            for kind, streams in (("text", self.text), ("chat", self.chat))
            for split in ("train", "heldout")
        }


def _split(docs: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    docs = list(docs)
    rng.shuffle(docs)
    n_heldout = max(1, int(len(docs) * HELDOUT_FRACTION))
    return docs[n_heldout:], docs[:n_heldout]


def build_token_data(tokenizer: Tokenizer, seed: int, num_chats: int = 12000) -> TokenData:
    rng = random.Random(seed)
    eot = tokenizer.token_id("<|endoftext|>")
    text_train, text_heldout = _split(load_corpus(seed=seed), rng)
    chat_train, chat_heldout = _split(rendered_chat_texts(tokenizer, num_chats, seed), rng)

    def stream(docs: list[str]) -> TokenStream:
        return TokenStream.from_docs([tokenizer.encode(d) for d in docs], eot)

    return TokenData(
        text={"train": stream(text_train), "heldout": stream(text_heldout)},
        chat={"train": stream(chat_train), "heldout": stream(chat_heldout)},
    )
