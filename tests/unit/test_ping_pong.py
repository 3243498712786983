"""Ping-pong micro-batches (MegaScale-Infer): a step split in two micro-batches interleaves per
layer (B's attention runs while A's experts are out) and never changes a greedy output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.cli.main import EMBEDDED_MODEL
from mimo.tokenizer import Tokenizer
from mimo.weights import load_model
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from replicas.experts.dispatch import ExpertDispatcher, ExpertTransport, ShardMessage
from replicas.experts.expert_placement import initial_placement
from replicas.experts.expert_shard import ExpertShard
from replicas.experts.transport_local import InProcessTransport
from tests.factory import random_config_dict, write_random_checkpoint

MOE_LAYERS = list(range(1, 7))
PROMPTS = [[5, 6, 7], list(range(10, 50)), [9] * 17, list(range(100, 130)), [3, 1, 4, 1, 5]]


class RecordingTransport(ExpertTransport):
    """The in-process shards behind an asynchronous-looking transport that logs sends and waits."""

    is_async = True

    def __init__(self, inner: InProcessTransport) -> None:
        self.inner = inner
        self.log: list[tuple[str, int, int]] = []  # (event, layer, rows)

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        rows = len({r for m in messages for r in m.rows.tolist()})  # the layer call's rows
        self.log.append(("send", layer, rows))
        return layer, rows, self.inner.send(layer, messages)

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, tuple)
        layer, rows, inner = handle
        self.log.append(("wait", layer, rows))
        return self.inner.wait(inner)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(path, random_config_dict(max_position_embeddings=512))
    return path


def _engine(path: Path, dispatcher: ExpertDispatcher | None) -> Engine:
    model = load_model(path, experts="all" if dispatcher is None else "none")
    config = EngineConfig(block_size=4, max_model_len=256, num_mtp_drafts=2)
    return Engine(model, Tokenizer.from_dir(EMBEDDED_MODEL), config, dispatcher)


def _outputs(engine: Engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(PROMPTS)])
    return [[t for c in out[f"r{i}"] for t in c.token_ids] for i in range(len(PROMPTS))]


def _dispatcher(path: Path, ping_pong: bool) -> tuple[ExpertDispatcher, RecordingTransport]:
    placement = initial_placement(MOE_LAYERS, 16, 2)
    shards = [ExpertShard.load(path, placement.experts_of_shard(s)) for s in range(2)]
    transport = RecordingTransport(InProcessTransport(shards))
    return ExpertDispatcher(transport, placement, 16, ping_pong=ping_pong), transport


def test_ping_pong_keeps_greedy_outputs(checkpoint: Path, one_thread: None) -> None:
    """Catches micro-batches that mix up rows (order of the concatenated halves), share attention
    metadata across halves, or drop a pending MoE result (prefill chunks, decode and MTP verify)."""
    expected = _outputs(_engine(checkpoint, None))
    dispatcher, transport = _dispatcher(checkpoint, ping_pong=True)
    assert _outputs(_engine(checkpoint, dispatcher)) == expected
    sends = [rows for event, _, rows in transport.log if event == "send"]
    total = sum(len(p) for p in PROMPTS)
    assert len(sends) >= 2 * len(MOE_LAYERS) and sum(sends) >= total  # split steps really ran


def test_ping_pong_interleaves_layers(checkpoint: Path, one_thread: None) -> None:
    """Catches a ping-pong that waits for A's experts before sending B's (no overlap), or that
    runs A's next attention before collecting A's experts."""
    dispatcher, transport = _dispatcher(checkpoint, ping_pong=True)
    engine = _engine(checkpoint, dispatcher)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add(GenerateRequest("a", list(range(10, 20)), params))  # 10 rows
    engine.add(GenerateRequest("b", list(range(30, 42)), params))  # 12 rows
    engine.step()  # one forward over both prompts
    expected: list[tuple[str, int, int]] = [("send", 1, 10), ("send", 1, 12)]
    for layer in MOE_LAYERS[1:]:
        expected += [
            ("wait", layer - 1, 10),
            ("send", layer, 10),
            ("wait", layer - 1, 12),
            ("send", layer, 12),
        ]
    expected += [("wait", MOE_LAYERS[-1], 10), ("wait", MOE_LAYERS[-1], 12)]
    assert transport.log == expected

    serial, plain = _dispatcher(checkpoint, ping_pong=False)
    engine = _engine(checkpoint, serial)
    engine.add(GenerateRequest("a", list(range(10, 20)), params))
    engine.add(GenerateRequest("b", list(range(30, 42)), params))
    engine.step()
    assert plain.log == [(e, layer, 22) for layer in MOE_LAYERS for e in ("send", "wait")]


def test_ping_pong_is_opt_in(checkpoint: Path) -> None:
    """Catches ping-pong switched on by default (measured slower on shared 2-core hosts: twice the
    messages, no spare core to overlap onto) or splitting a single sequence (nothing to split)."""
    placement = initial_placement(MOE_LAYERS, 16, 2)
    shards = [ExpertShard.load(checkpoint, placement.experts_of_shard(s)) for s in range(2)]
    remote = RecordingTransport(InProcessTransport(shards))
    assert not ExpertDispatcher(remote, placement, 16).use_ping_pong(32)
    asked = ExpertDispatcher(remote, placement, 16, ping_pong=True)
    assert asked.use_ping_pong(2) and not asked.use_ping_pong(1)
