"""DeepSpeed AutoTP for an attention replica: two ranks over gloo on 127.0.0.1 give the logits and
the greedy engine outputs of the unsharded model (fp32)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.cli.main import EMBEDDED_MODEL
from mimo.model import DecoderLayer, MiMoForCausalLM
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig

pytestmark = pytest.mark.integration
PROMPTS = [[5, 6, 7], list(range(10, 50)), [9] * 17]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(model: MiMoForCausalLM, path: Path) -> dict[str, Any]:
    """Plain-path logits of one prompt, and greedy tokens through the paged engine (with MTP)."""
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        logits = model.logits(model.forward_hidden(ids, torch.arange(ids.shape[1]))).float()
    engine = Engine(
        model, Tokenizer.from_dir(path), EngineConfig(block_size=4, max_model_len=256, num_mtp_drafts=2)
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(PROMPTS)])
    tokens = [[t for c in out[f"r{i}"] for t in c.token_ids] for i in range(len(PROMPTS))]
    return {"logits": logits, "tokens": tokens}


def _q_rows(model: MiMoForCausalLM) -> int:
    layer = model.model.layers[0]
    assert isinstance(layer, DecoderLayer)
    return int(layer.self_attn.q_proj.weight.shape[0])


def _rank_main(rank: int, tp_size: int, port: int, path: str, results: Any) -> None:
    from replicas.engine.tensor_parallel import TPRank, shard_model

    torch.set_num_threads(1)
    model = shard_model(load_model(path), TPRank(rank, tp_size, "127.0.0.1", port))
    out = _run(model, Path(path))
    out["q_rows"] = _q_rows(model)
    out["logits"] = out["logits"].numpy()  # by value: a shared-memory tensor dies with this process
    results.put((rank, out))


def test_tp2_matches_tp1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches AutoTP splitting our custom modules wrongly (o_proj column- instead of row-parallel,
    heads not narrowed, sinks of the wrong heads, GQA groups crossing ranks, lm_head on [N, H] rows):
    any of them changes the logits or the greedy tokens, or crashes a rank.

    The ranks start beside a stale DeepSpeed build lock (what a rank killed mid-build leaves): a
    rank that tried to JIT-build the shared-memory all-reduce would wait on it until the deadline."""
    stale = tmp_path / "torch_extensions" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    path = Path(EMBEDDED_MODEL)
    torch.set_num_threads(1)
    model = load_model(path)
    expected = _run(model, path)
    full_q_rows = _q_rows(model)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(path), results)) for r in range(2)]
    for p in procs:
        p.start()
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 180  # ~15 s here
    try:
        while len(got) < len(procs):
            try:
                rank, out = results.get(timeout=2)
                got[rank] = out
            except queue.Empty:  # a rank that crashed leaves its peer blocked in a collective
                assert all(p.is_alive() or p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
                assert time.monotonic() < deadline
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        assert got[rank]["q_rows"] == full_q_rows // 2  # really sharded
        torch.testing.assert_close(
            torch.from_numpy(got[rank]["logits"]), expected["logits"], rtol=0, atol=2e-5
        )
        assert got[rank]["tokens"] == expected["tokens"]
