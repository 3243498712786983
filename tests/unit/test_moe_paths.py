"""`Experts` picks one of five computations by batch shape (`mimo/moe.py`); each must equal the
plain per-token sum over the token's chosen experts, whichever it is, for a whole layer and for a
shard holding a subset of the experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimo.config import MiMoConfig
from mimo.linear import row_bucket
from mimo.moe import Experts, Routing
from tests.factory import random_config_dict

CONFIG = MiMoConfig.from_hub_dict(random_config_dict())  # 16 experts, top-4, hidden 64
PATHS = ("_single_token", "_union", "_dense", "_padded", "_grouped")


def _experts(expert_ids: list[int] | None) -> Experts:
    experts = Experts(CONFIG, expert_ids)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (experts.gate_up_proj, experts.down_proj):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return experts


def _routing(num_rows: int, skew: float, seed: int) -> Routing:
    """Top-4 of 16 per row; skew > 0 sends most rows to the first experts (a trained router)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_rows, CONFIG.num_experts, generator=gen)
    scores -= skew * torch.arange(CONFIG.num_experts) / CONFIG.num_experts
    ids = scores.topk(CONFIG.num_experts_per_tok, dim=-1).indices
    weights = torch.rand(ids.shape, generator=gen)
    return Routing(ids, weights / weights.sum(-1, keepdim=True))


def _reference(experts: Experts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    out = torch.zeros_like(x)
    held = experts.expert_ids
    for row in range(x.shape[0]):
        for e, w in zip(routing.expert_ids[row].tolist(), routing.weights[row].tolist(), strict=True):
            if e not in held:
                continue
            local = held.index(e)
            gate, up = F.linear(x[row], experts.gate_up_proj[local]).split(experts.intermediate_size)
            out[row] += w * F.linear(F.silu(gate) * up, experts.down_proj[local])
    return out


@pytest.mark.parametrize(
    ("num_rows", "skew", "expected"),
    [
        (1, 0.0, "_single_token"),  # decode of one sequence
        (2, 3.0, "_union"),  # an MTP verify: few rows, few distinct experts
        (8, 0.0, "_dense"),  # small decode batch touching most experts
        (32, 0.0, "_dense"),  # decode at 32 sequences
        (32, 3.0, "_dense"),  # the same, skewed
        (33, 0.0, "_padded"),  # past the decode sizes
        (300, 0.0, "_padded"),  # a prefill chunk spread evenly
        (300, 3.0, "_grouped"),  # a skewed prefill chunk: padding would waste > 1.5x
    ],
)
@pytest.mark.parametrize("expert_ids", [None, [1, 3, 4, 8, 9, 12, 14, 15]], ids=["layer", "shard"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_equals_per_token_reference(
    num_rows: int, skew: float, expected: str, expert_ids: list[int] | None, packed: bool,
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Catches a path that drops, duplicates or misweights a (row, expert) pair, or mixes rows, with
    the stacked experts plain or packed (the paged forward packs them on the CPU), in fp32 and in
    bf16 (where every matmul pads its rows to a bucket)."""
    experts = _experts(expert_ids).to(dtype)
    if packed:
        experts.pack()
        assert experts.packed is not None
    ran: list[str] = []
    for name in PATHS:
        method = getattr(Experts, name)

        def spy(self: Experts, *args: object, _name: str = name, _method: object = method) -> torch.Tensor:
            ran.append(_name)
            return _method(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(Experts, name, spy)
    x = torch.randn(num_rows, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    routing = _routing(num_rows, skew, seed=num_rows)
    with torch.no_grad():
        got = experts(x, routing)
        want = _reference(experts, x, routing)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    if expert_ids is None:  # a shard's smaller expert count moves the size boundaries
        assert ran == [expected]
    else:
        assert len(ran) == 1


@pytest.mark.parametrize(("num_rows", "skew"), [(33, 0.0), (300, 0.0), (300, 3.0), (77, 3.0)])
def test_low_precision_expert_matmuls_see_bucketed_row_counts(
    num_rows: int, skew: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches per-expert row counts reaching oneDNN as they come (one kernel per count: most of the
    ~900 MB a bf16 engine grew by under random prompt lengths): the padded and grouped prefill paths
    run every bf16 matmul at a `row_bucket` row count."""
    seen: list[int] = []
    real_bmm, real_matmul = torch.bmm, torch.Tensor.__matmul__

    def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(a.shape[1])
        return real_bmm(a, b)

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(a.shape[0])
        return real_matmul(a, b)

    experts = _experts(None).to(torch.bfloat16)
    x = torch.randn(num_rows, CONFIG.hidden_size).to(torch.bfloat16)
    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    with torch.no_grad():
        experts(x, _routing(num_rows, skew, seed=num_rows))
    assert seen and all(row_bucket(rows) == rows for rows in seen)
