"""Trains the tiny MiMo's byte-level BPE tokenizer and writes hub-style tokenizer files.

ChatML control tokens are special (dropped by decode); the reasoning and tool markup tokens are added
but not special, so they decode as text for the gateway's parsers. Digits are split one by one, as in
Qwen2's pre-tokenizer, so arithmetic sees every digit. Same texts in, same files out.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from mimo.chat_template import DEFAULT_TEMPLATE_PATH, ChatTemplate
from mimo.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer
from training.corpus import DEFAULT_MAX_CHARS, load_corpus
from training.dialogues import chat_dialogues, rendered_chat_texts, tool_dialogues

# Order fixes the ids: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, then the markup tokens 3-8.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
# Qwen2's split: contractions, words with one leading non-letter, single digits, punctuation runs,
# newlines, spaces (a trailing space stays with the next word).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_ADDED_TOKEN_RE = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS + MARKUP_TOKENS))
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MODEL_MAX_LENGTH = 2048


def _pieces_between_added_tokens(texts: Iterable[str]) -> Iterator[str]:
    # Added tokens are matched before BPE at encode time, so merges must never learn across them.
    for text in texts:
        yield from (piece for piece in _ADDED_TOKEN_RE.split(text) if piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """A byte-level BPE with `vocab_size` ids in total, added tokens included."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        # The trainer marks all of these special; the markup tokens are un-marked below, keeping ids 3-8.
        special_tokens=[
            AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + MARKUP_TOKENS
        ],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_pieces_between_added_tokens(texts), trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tokenizer


def write_tokenizer_files(
    tokenizer: tokenizers.Tokenizer, out_dir: str | Path, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # transformers would otherwise "clean up" spaces before punctuation and break decode parity.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8"),
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8"
    )


def _num_tokens(tokenizer: Tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer.encode(text)) for text in texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write into")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--corpus-chars", type=int, default=DEFAULT_MAX_CHARS)
    parser.add_argument(
        "--num-dialogues", type=int, default=2000, help="rendered dialogues added to the corpus"
    )
    parser.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = load_corpus(args.corpus_chars, args.seed)
    dialogues = rendered_chat_texts(ChatTemplate.default(), args.num_dialogues, args.seed)
    start_s = time.perf_counter()
    backend = train_tokenizer(corpus + dialogues, args.vocab_size)
    train_s = time.perf_counter() - start_s
    write_tokenizer_files(backend, args.out, args.model_max_length)

    tokenizer = Tokenizer.from_dir(args.out)
    template = tokenizer.chat_template
    tool_texts = [template.render(d.messages, d.tools, False) for d in tool_dialogues(1000, args.seed + 7)]
    chat_texts = [template.render(d.messages, d.tools, False) for d in chat_dialogues(1000, args.seed + 8)]
    print(f"wrote {args.out}: vocab {tokenizer.vocab_size}, trained in {train_s:.1f} s")
    num_chars = sum(map(len, corpus))
    print(f"corpus: {len(corpus)} documents, {num_chars} chars, {_num_tokens(tokenizer, corpus)} tokens")
    print(f"dialogues: {len(dialogues)} rendered, {_num_tokens(tokenizer, dialogues)} tokens")
    print(f"tokens per rendered tool dialogue: {_num_tokens(tokenizer, tool_texts) / len(tool_texts):.1f}")
    print(f"tokens per rendered chat dialogue: {_num_tokens(tokenizer, chat_texts) / len(chat_texts):.1f}")


if __name__ == "__main__":
    main()
