"""The paged forward's rearranged weights and attention layout against the `mimo` reference math:
fused q/k/v projection with RoPE, the cached rope table, and paged attention over mixed groups."""

from __future__ import annotations

import pytest
import torch

import replicas.engine.attention_batch as attention_batch_module
import replicas.engine.online_attention as online_attention_module
import replicas.engine.paged_attention as paged_attention_module
from mimo.attention import Attention
from mimo.config import MiMoConfig
from mimo.layers import RotaryEmbedding
from replicas.engine.attention_batch import Segment, build_batch, narrow_queries
from replicas.engine.fused_weights import FusedAttention, RopeTable
from replicas.engine.paged_attention import PagedKV, paged_attention
from tests.factory import random_config_dict


def _attention(seed: int) -> tuple[MiMoConfig, Attention]:
    config = MiMoConfig.from_hub_dict(random_config_dict())
    torch.manual_seed(seed)
    attn = Attention(config, config.sliding_attention)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return config, attn


def test_fused_projection_equals_module_projection() -> None:
    """Catches a wrong rotate-half partner row, the softmax scale folded into k instead of q, the value
    scale lost, or K/V of one KV head not side by side (each changes q or the cached K/V row)."""
    config, attn = _attention(0)
    rotary = RotaryEmbedding(config.rotary_dim, config.sliding_attention.rope_theta)
    positions = torch.tensor([0, 3, 17, 250])
    cos, sin = rotary(positions, torch.float32)
    x = torch.randn(4, config.hidden_size)
    q, k, v = attn.project(x, cos, sin)
    fused = FusedAttention.build(attn, config.rotary_dim)
    fq, fkv = fused.project(x, cos.unsqueeze(1), sin.unsqueeze(1))
    s = config.sliding_attention
    assert fq.shape == (4, s.num_q_heads, s.qk_head_dim)
    assert fkv.shape == (4, s.num_kv_heads, s.qk_head_dim + s.v_head_dim)
    torch.testing.assert_close(fq, q * attn.scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(fkv[..., : s.qk_head_dim], k, rtol=0, atol=1e-5)
    torch.testing.assert_close(fkv[..., s.qk_head_dim :], v, rtol=0, atol=1e-5)


def test_rope_table_equals_rotary_embedding_after_growth() -> None:
    """Catches a table that is not grown (or grown wrong) when a position beyond it appears, and any
    drift from the module's math (rows must be bit-identical)."""
    rotary = RotaryEmbedding(16, 10_000.0)
    table = RopeTable(rotary, torch.float32, torch.device("cpu"))
    for positions in (torch.tensor([0, 5, 63]), torch.tensor([64, 1000, 7]), torch.tensor([4095, 2])):
        cos, sin = table.lookup(positions, int(positions.max()))
        ref_cos, ref_sin = rotary(positions, torch.float32)
        assert torch.equal(cos[:, 0], ref_cos) and torch.equal(sin[:, 0], ref_sin)
    assert table.table.shape[0] == 4096


def test_paged_attention_equals_reference_over_mixed_groups() -> None:
    """Catches a wrong gather slot, mask, sink column or row scatter when one step mixes a decode, a
    prefill chunk and a verify segment (three groups) on a sliding window with released blocks: every
    query's output must equal the reference `attend` over that sequence's whole history."""
    config, attn = _attention(1)
    s = config.sliding_attention
    window, block = config.sliding_window_size, 4
    fused = FusedAttention.build(attn, config.rotary_dim)
    kv = PagedKV(
        1, 32, block, s.num_kv_heads, s.qk_head_dim, s.v_head_dim, torch.float32, torch.device("cpu")
    )
    rotary = RotaryEmbedding(config.rotary_dim, s.rope_theta)
    lengths, fed = [13, 9, 20], [1, 5, 3]  # tokens so far (incl. this step's), tokens fed this step
    tables = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]
    xs = [torch.randn(n, config.hidden_size) for n in lengths]

    def run(segs: list[tuple[int, int, int]]) -> torch.Tensor:  # (seq, start, count)
        rows = 0
        segments: list[Segment] = []
        x_rows: list[torch.Tensor] = []
        pos: list[int] = []
        for i, start, count in segs:
            table: list[int | None] = list(tables[i])
            for b in range(len(table)):  # blocks wholly outside every remaining window are released
                if (b + 1) * block <= start - window:
                    table[b] = None
            segments.append(Segment(rows, count, start, table))
            x_rows.append(xs[i][start : start + count])
            pos.extend(range(start, start + count))
            rows += count
        batch = build_batch(segments, block, window, torch.device("cpu"), kv.zero_slot, s.num_kv_heads,
                            s.num_q_per_kv, s.has_sink)  # fmt: skip
        cos, sin = rotary(torch.tensor(pos), torch.float32)
        q, kv_new = fused.project(torch.cat(x_rows), cos.unsqueeze(1), sin.unsqueeze(1))
        # the step's groups gather in turn into one shared buffer (as the paged forward passes)
        scratch = kv.gather_buffer(batch.gather_rows)
        return paged_attention(q, kv_new, kv.kv[0], batch, fused.sink, scratch)

    run([(i, 0, n - f) for i, (n, f) in enumerate(zip(lengths, fed, strict=True))])  # history
    got = run([(i, n - f, f) for i, (n, f) in enumerate(zip(lengths, fed, strict=True))])
    offset = 0
    for i, (n, f) in enumerate(zip(lengths, fed, strict=True)):
        positions = torch.arange(n)
        q, k, v = attn.project(xs[i].unsqueeze(0), *rotary(positions, torch.float32))
        ref = attn.attend(q[:, n - f :], k, v, positions[n - f :], positions)[0].flatten(-2)
        torch.testing.assert_close(got[offset : offset + f], ref, rtol=0, atol=1e-5)
        offset += f


def test_low_precision_cache_is_attended_in_fp32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches bf16 attention reaching oneDNN's bmm on the CPU (a compiled kernel per shape: a bf16
    engine grew by ~900 MB under prompts of random lengths), or a result other than fp32 attention
    over the same bf16 values, rounded once: two prefill groups, then a decode step."""
    config, attn = _attention(3)
    s = config.sliding_attention
    window, block = config.sliding_window_size, 4
    fused = FusedAttention.build(attn, config.rotary_dim)
    rotary = RotaryEmbedding(config.rotary_dim, s.rope_theta)
    heads = (s.num_kv_heads, s.num_q_per_kv, s.has_sink)
    tables: list[list[int | None]] = [[0, 1, 2], [3, 4, 5, 6]]
    steps = [[(0, 0, 9), (1, 0, 13)], [(0, 9, 1), (1, 13, 1)]]  # (seq, start, count)
    inputs = []
    for segs in steps:
        pos = [position for _, start, count in segs for position in range(start, start + count)]
        cos, sin = rotary(torch.tensor(pos), torch.float32)
        x = torch.randn(len(pos), config.hidden_size)
        q, kv_new = fused.project(x, cos.unsqueeze(1), sin.unsqueeze(1))
        inputs.append((q.bfloat16(), kv_new.bfloat16()))
    matmul_dtypes: set[torch.dtype] = set()
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)

        def spy(*args: torch.Tensor, _real: object = real) -> torch.Tensor:
            matmul_dtypes.add(args[-1].dtype)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(torch, name, spy)
    outs = {}
    for dtype in (torch.bfloat16, torch.float32):
        kv = PagedKV(1, 32, block, s.num_kv_heads, s.qk_head_dim, s.v_head_dim, dtype, torch.device("cpu"))
        for segs, (q, kv_new) in zip(steps, inputs, strict=True):
            segments: list[Segment] = []
            rows = 0
            for i, start, count in segs:
                segments.append(Segment(rows, count, start, tables[i]))
                rows += count
            batch = build_batch(segments, block, window, torch.device("cpu"), kv.zero_slot, *heads)
            outs[dtype] = paged_attention(q.to(dtype), kv_new.to(dtype), kv.kv[0], batch, fused.sink)
        if dtype == torch.bfloat16:
            assert matmul_dtypes == {torch.float32}
    assert outs[torch.bfloat16].dtype == torch.bfloat16
    assert torch.equal(outs[torch.bfloat16], outs[torch.float32].bfloat16())


@pytest.mark.parametrize("window", [None, 8])
def test_key_counts_are_bucketed_and_padding_is_masked_zero_slots(window: int | None) -> None:
    """Catches a GA decode step whose key count grows one by one (a new bf16 kernel shape every step),
    a window pool padded beyond what its window can show, or padding keys that are visible or read
    a live slot: key counts are multiples of KEY_BUCKET (or the window's cap) and padding is masked."""
    block, zero = 4, 64
    bucket = attention_batch_module.KEY_BUCKET
    for length in range(1, 40):
        table: list[int | None] = list(range((length + block - 1) // block))
        seg = Segment(0, 1, length - 1, table)  # one decode token at position length - 1
        batch = build_batch([seg], block, window, torch.device("cpu"), zero, 1, 1, False)
        (g,) = batch.groups
        assert g.mask is not None
        visible = g.mask[0, 0, 0, 0] == 0
        keys = g.mask.shape[-1]
        seen = length if window is None else min(length, window + 1)
        cap = float("inf") if window is None else window + 1
        assert keys == min(-(-seen // bucket) * bucket, cap)
        assert int(visible.sum()) == seen
        assert bool((g.key_rows[:keys][~visible] == zero).all())


def test_narrowed_batch_attends_as_a_batch_built_for_its_rows() -> None:
    """Catches a narrowed one-sequence batch (the MTP blocks share one per step) letting a query see a
    later key or one outside its window, or writing K/V of rows outside its range: each sub-range of
    a 70-slot sequence (window crossed, released blocks) must match a batch built for exactly it."""
    config, attn = _attention(2)
    s = config.sliding_attention
    window, block, length = config.sliding_window_size, 4, 70
    fused = FusedAttention.build(attn, config.rotary_dim)
    rotary = RotaryEmbedding(config.rotary_dim, s.rope_theta)
    x = torch.randn(length, config.hidden_size)
    heads = (s.num_kv_heads, s.num_q_per_kv, s.has_sink)
    lo, hi = length - 6, length  # the shared range; blocks before its window are released
    table: list[int | None] = [
        b if (b + 1) * block > lo - window else None for b in range(length // block + 1)
    ]

    def cache() -> PagedKV:
        kv = PagedKV(
            1, 32, block, s.num_kv_heads, s.qk_head_dim, s.v_head_dim, torch.float32, torch.device("cpu")
        )
        full = build_batch([Segment(0, lo, 0, list(range(length // block + 1)))], block, window,
                           torch.device("cpu"), kv.zero_slot, *heads)  # fmt: skip
        cos, sin = rotary(torch.arange(lo), torch.float32)
        paged_attention(
            *fused.project(x[:lo], cos.unsqueeze(1), sin.unsqueeze(1)), kv.kv[0], full, fused.sink
        )
        return kv

    for start, stop in [(lo, hi), (lo + 2, hi), (lo + 1, hi - 2), (hi - 1, hi)]:
        kv_ref, kv_got = cache(), cache()
        cos, sin = rotary(torch.arange(start, stop), torch.float32)
        q, kv_new = fused.project(x[start:stop], cos.unsqueeze(1), sin.unsqueeze(1))
        own = build_batch([Segment(0, stop - start, start, table)], block, window, torch.device("cpu"),
                          kv_ref.zero_slot, *heads)  # fmt: skip
        shared = build_batch([Segment(0, hi - lo, lo, table)], block, window, torch.device("cpu"),
                             kv_got.zero_slot, *heads)  # fmt: skip
        narrowed = narrow_queries(shared, start - lo, stop - start, s.num_kv_heads, s.num_q_per_kv)
        ref = paged_attention(q.clone(), kv_new.clone(), kv_ref.kv[0], own, fused.sink)
        got = paged_attention(q, kv_new, kv_got.kv[0], narrowed, fused.sink)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        assert torch.equal(kv_got.kv[0], kv_ref.kv[0])


@pytest.mark.parametrize("pool", ["swa_sink", "swa", "ga"])
def test_banded_prefill_equals_reference(pool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a band that misses a visible key (a query block's first keys, a segment whose window
    starts at 0, the sink) or lets in a hidden one: three 130-token chunks in one group, started at
    positions 0, 5 and 40 (their key offsets differ), attended in 32-query blocks on a window-8 SWA
    pool with and without sinks, and on a GA pool key block by key block (online softmax, 32 keys
    and 8 queries a block), must equal the reference over each whole history, and the plain path."""
    config = MiMoConfig.from_hub_dict(random_config_dict(add_swa_attention_sink_bias=pool == "swa_sink"))
    torch.manual_seed(2)
    shape = config.full_attention if pool == "ga" else config.sliding_attention
    attn = Attention(config, shape)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    window = None if pool == "ga" else config.sliding_window_size
    block, fed = 4, 130
    fused = FusedAttention.build(attn, config.rotary_dim)
    starts = [0, 5, 40]
    tables = [list(range(i * 48, (i + 1) * 48)) for i in range(3)]
    xs = [torch.randn(start + fed, config.hidden_size) for start in starts]
    rotary = RotaryEmbedding(config.rotary_dim, shape.rope_theta)
    calls: list[int] = []
    name = "online_attention" if pool == "ga" else "_banded"
    blockwise = getattr(paged_attention_module, name)

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        out: torch.Tensor = blockwise(*args)
        return out

    monkeypatch.setattr(paged_attention_module, name, counted)
    monkeypatch.setattr(online_attention_module, "ONLINE_KEYS", 32)
    monkeypatch.setattr(online_attention_module, "ONLINE_ROWS", 8 * shape.num_q_per_kv)

    def run(kv: PagedKV, segs: list[tuple[int, int, int]]) -> torch.Tensor:  # (seq, start, count)
        segments, x_rows, rows = [], [], 0
        pos: list[int] = []
        for i, start, count in segs:
            segments.append(Segment(rows, count, start, tables[i]))
            x_rows.append(xs[i][start : start + count])
            pos.extend(range(start, start + count))
            rows += count
        batch = build_batch(segments, block, window, torch.device("cpu"), kv.zero_slot, shape.num_kv_heads,
                            shape.num_q_per_kv, shape.has_sink)  # fmt: skip
        cos, sin = rotary(torch.tensor(pos), torch.float32)
        q, kv_new = fused.project(torch.cat(x_rows), cos.unsqueeze(1), sin.unsqueeze(1))
        return paged_attention(q, kv_new, kv.kv[0], batch, fused.sink)

    def step(min_blocks: int) -> torch.Tensor:
        monkeypatch.setattr(attention_batch_module, "BANDED_MIN_BLOCKS", min_blocks)
        monkeypatch.setattr(attention_batch_module, "ONLINE_MIN_QUERIES", 16 if min_blocks < 10**6 else 10**6)
        kv = PagedKV(
            1, 160, block, shape.num_kv_heads, shape.qk_head_dim, shape.v_head_dim, torch.float32,
            torch.device("cpu"),
        )  # fmt: skip
        run(kv, [(i, 0, start) for i, start in enumerate(starts) if start])  # history
        return run(kv, [(i, start, fed) for i, start in enumerate(starts)])

    full = step(10**6)
    assert not calls
    got = step(4)
    assert calls
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    for i, start in enumerate(starts):
        positions = torch.arange(start + fed)
        q, k, v = attn.project(xs[i].unsqueeze(0), *rotary(positions, torch.float32))
        ref = attn.attend(q[:, start:], k, v, positions[start:], positions)[0].flatten(-2)
        torch.testing.assert_close(got[i * fed : (i + 1) * fed], ref, rtol=0, atol=5e-5)
        torch.testing.assert_close(full[i * fed : (i + 1) * fed], ref, rtol=0, atol=5e-5)


def test_paged_model_packs_every_cpu_matmul_weight() -> None:
    """Catches a decode matmul left on a plain weight on the CPU (oneDNN re-lays it out per call):
    the fused projections and MLPs, o_proj, lm_head and the stacked experts all carry packs."""
    from mimo.linear import Linear
    from mimo.moe import Experts
    from replicas.engine.paged_model import PagedModel
    from tests.factory import random_model

    config = MiMoConfig.from_hub_dict(random_config_dict(num_layers=3))
    paged = PagedModel(random_model(config), 8, 8, 4, 1)
    assert all(f.packed is not None for f in paged.fused.values())
    assert paged.fused_mlp and all(m.packed is not None for m in paged.fused_mlp.values())
    modules = list(paged.model.modules())
    assert all(m.packed is not None for m in modules if isinstance(m, Linear | Experts))
    assert paged.model.lm_head.packed is not None
