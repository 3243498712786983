"""The embedded trained tiny model: its architecture rules, its outputs against transformers via
`mimo generate`, and the abilities the report claims (MTP drafts, tool calls), re-measured here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli.main import EMBEDDED_MODEL, main
from mimo.config import LayerType, MiMoConfig
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from training.evaluate import mtp_agreement, tool_call_validity

transformers = pytest.importorskip("transformers")

SPECIAL = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model(EMBEDDED_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_MODEL)


def test_tiny_checkpoint_keeps_the_release_architecture() -> None:
    """Catches a tiny model that drifts from the release's layout (and so tests nothing real)."""
    c = MiMoConfig.from_file(EMBEDDED_MODEL)
    ga = [i for i, t in enumerate(c.layer_types) if t is LayerType.FULL]
    assert ga == [i for i in range(c.num_hidden_layers) if i == 0 or (i + 1) % 6 == 0] and len(ga) >= 2
    assert c.full_attention.qk_head_dim != c.full_attention.v_head_dim
    assert c.sliding_attention.has_sink and not c.full_attention.has_sink
    assert c.num_experts >= 16 and c.num_experts_per_tok >= 4 and c.num_mtp_layers == 3
    files = list(EMBEDDED_MODEL.iterdir())
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    names = {f.name for f in files}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "generation_config.json" in names
    assert "chat_template" in json.loads((EMBEDDED_MODEL / "tokenizer_config.json").read_text())


def test_special_tokens_are_single_tokens(tokenizer: Tokenizer) -> None:
    """Catches a tokenizer that splits the control tokens the parsers and the template rely on."""
    for token in SPECIAL:
        assert len(tokenizer.encode(token)) == 1


def _prompts(tokenizer: Tokenizer) -> list[tuple[list[str], list[int], tuple[int, ...]]]:
    """(CLI args, prompt ids, stop ids) for 8 prompts: plain text, chat, and several windows long."""
    doc = (Path(json.__file__).read_text())[:6000]
    texts = [
        "def fibonacci(n):",
        "The json module",
        "Return the absolute value of",
        doc[:1200],
        doc[1500:4000],
    ]
    chats = ["What is the weather in Paris?", "What is 12 + 30?", "What does `os.path.join` do?"]
    out = [(["--prompt", t], tokenizer.encode(t), ()) for t in texts]
    for c in chats:
        ids = tokenizer.encode_chat([{"role": "user", "content": c}])
        out.append((["--prompt", c, "--chat"], ids, tokenizer.eos_token_ids))
    return out


def test_mimo_generate_matches_transformers(
    model: torch.nn.Module, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches any divergence from the reference on the trained weights, including prompts several
    SWA windows long; also checks fp32 logits within 1e-4."""
    ref = transformers.MiMoV2FlashForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    window = MiMoConfig.from_file(EMBEDDED_MODEL).sliding_window_size
    prompts = _prompts(tokenizer)
    assert max(len(ids) for _, ids, _ in prompts) > 4 * window
    for args, ids, stop in prompts:
        assert main(["generate", *args, "--max-tokens", "64", "--json"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["prompt_token_ids"] == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            expected = ref.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=list(stop) or None,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
            logits_ref = ref(x).logits[0]
            logits_ours = model.logits(model.forward_hidden(x, torch.arange(len(ids))))[0]
        assert record["token_ids"] == expected
        assert (logits_ref - logits_ours).abs().max().item() < 1e-4


def test_mtp_block0_drafts_agree_with_greedy(model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    """Catches untrained or mis-wired MTP blocks (wrong shift, wrong hidden state fed in)."""
    from mimo.generate import SamplingParams, generate

    seqs = []
    for _, ids, _ in _prompts(tokenizer):
        seqs.append((ids, generate(model, ids, SamplingParams(max_new_tokens=48)).token_ids))
    report = mtp_agreement(model, seqs)
    assert report["block_agreement"][0] >= 0.5
    assert report["acceptance_length_3_drafts"] > 1.5


def test_heldout_tool_prompts_give_parseable_calls(model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    """Catches a model (or template/parser pair) whose tool calls the gateway could not parse."""
    report = tool_call_validity(model, tokenizer, num_prompts=20)
    assert report["parseable_rate"] >= 0.9
