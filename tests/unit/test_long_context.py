"""Long context on the tiny model: a 32K-token prompt through chunked prefill, with KV memory
equal to the hybrid theory (SWA layers flat beyond the window) and far below all-global."""

from __future__ import annotations

import torch

from cluster.cli.main import EMBEDDED_MODEL
from mimo.generate import SamplingParams as PlainParams
from mimo.generate import generate
from mimo.sizes import kv_bytes_for_sequence
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig

BLOCK = 16


def _peak_kv_bytes(num_tokens: int) -> tuple[int, int, list[int]]:
    """Runs one prompt of num_tokens; returns peak bytes held (GA pool, SWA pool) and the output."""
    model = load_model(EMBEDDED_MODEL)
    engine = Engine(
        model,
        Tokenizer.from_dir(EMBEDDED_MODEL),
        EngineConfig(block_size=BLOCK, kv_cache_bytes=128 * 2**20, max_prefill_chunk=2048, max_num_seqs=4),
    )
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 4000, (num_tokens,), generator=gen).tolist()
    engine.add(
        GenerateRequest("long", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    )
    peak_full = peak_swa = 0
    tokens: list[int] = []
    while engine.has_work():
        tokens += [t for c in engine.step() for t in c.token_ids]
        usage = engine.kv_cache.usage()
        peak_full = max(peak_full, usage["full"].num_used)
        peak_swa = max(peak_swa, usage["swa"].num_used)
    paged = engine.runner.paged
    full_bytes = paged.full_kv.bytes // engine.kv_cache.layout.num_full_blocks
    swa_bytes = paged.swa_kv.bytes // engine.kv_cache.layout.num_swa_blocks
    return peak_full * full_bytes, peak_swa * swa_bytes, [*prompt, *tokens]


def test_kv_memory_matches_hybrid_theory_at_4k_and_32k() -> None:
    """Catches SWA blocks never being released (memory growing with context on SWA layers) and GA
    accounting drift; also runs a >= 32K-token prompt end to end and checks its tokens."""
    config = load_model(EMBEDDED_MODEL, experts="none", mtp=False).config
    measured = {}
    long_seq: list[int] = []
    for n in (4096, 32768):
        full, swa, seq = _peak_kv_bytes(n)
        theory = kv_bytes_for_sequence(config, n, dtype_bytes=4)
        assert theory < kv_bytes_for_sequence(config, n, hybrid=False, dtype_bytes=4)
        # GA: every prompt token (n is a multiple of the block), exactly the theory's GA share;
        # SWA: the window plus the prefill chunk being written (2048 tokens) plus block edges
        ga_theory = theory - 4 * 65 * 4 * (48 + 32) * 4  # minus 4 SWA layers x (window + 1) tokens
        assert full == n * 2 * 2 * (48 + 32) * 4 == ga_theory
        swa_window_bytes = 4 * 4 * (48 + 32) * 4  # 4 SWA layers x 4 KV heads x (48+32) x fp32, per token
        assert swa <= (64 + 2048 + 2 * BLOCK) * swa_window_bytes
        measured[n] = (full, swa, theory)
        if n == 32768:
            long_seq = seq
    assert measured[32768][1] == measured[4096][1]  # SWA flat beyond the window
    ref = generate(load_model(EMBEDDED_MODEL), long_seq[:32768], PlainParams(max_new_tokens=2)).token_ids
    assert long_seq[32768:] == ref
