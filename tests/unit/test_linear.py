"""mimo.linear: the decode-step layout gives F.linear's result, contiguous, for every row count and
thread setting, and `Linear` is an `nn.Linear` with the same state-dict key."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mimo.linear as linear_module
from mimo.linear import MAX_GEMV_ELEMENTS, MAX_ROWS_ONE_THREAD, MAX_ROWS_THREADS, Linear, PackedWeight, linear


@pytest.fixture(params=[1, 2])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "rows", [1, 2, 3, MAX_ROWS_ONE_THREAD, MAX_ROWS_ONE_THREAD + 1, MAX_ROWS_THREADS, 33]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_f_linear(rows: int, dtype: torch.dtype, threads: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = torch.randn(200, 96, generator=g).to(dtype)
    y = linear(x, w)
    assert y.shape == (rows, 200) and y.dtype == dtype and y.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=tol, atol=tol)


def test_transposed_weight_view_and_batched_input() -> None:
    # the union expert path passes a transposed view of the down projection; 3-D inputs take F.linear
    w = torch.randn(32, 64).t()
    x = torch.randn(8, 32)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 5, 32)
    torch.testing.assert_close(linear(x3, w), F.linear(x3, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("onednn_before", [True, False])
def test_one_low_precision_row_takes_aten_gemv_and_restores_onednn(
    dtype: torch.dtype, onednn_before: bool
) -> None:
    """Catches a wrong orientation of the gemv (a [out, in] weight and the MoE's transposed down
    projection view), a lost row dim, or oneDNN left switched off (or on) after the call."""
    g = torch.Generator().manual_seed(7)
    contiguous = torch.randn(192, 256, generator=g).to(dtype)
    transposed = torch.randn(96, 256, generator=g).to(dtype).t()  # [256, 96], strides (1, 256)
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(onednn_before)
    try:
        for w in (contiguous, transposed):
            x = torch.randn(1, w.shape[1], generator=g).to(dtype)
            y = linear(x, w)
            assert y.shape == (1, w.shape[0]) and y.dtype == dtype
            torch.testing.assert_close(y.float(), x.float() @ w.float().T, rtol=2e-2, atol=2e-2)
            assert torch._C._get_mkldnn_enabled() is onednn_before
    finally:
        torch._C._set_mkldnn_enabled(before)


def test_module_is_a_bias_free_nn_linear() -> None:
    layer = Linear(16, 8)
    assert isinstance(layer, nn.Linear) and layer.bias is None
    assert list(layer.state_dict()) == list(nn.Linear(16, 8, bias=False).state_dict()) == ["weight"]
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 8, 33, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [200, MAX_GEMV_ELEMENTS // 64 + 8], ids=["small", "large"])
def test_packed_weight_equals_f_linear(rows: int, dtype: torch.dtype, out_features: int) -> None:
    """Catches a pack of the wrong orientation or a dropped row, for every row count the packed path
    takes (and the one-row gemv it leaves small weights to), including a transposed weight view."""
    g = torch.Generator().manual_seed(rows)
    for w in (
        torch.randn(out_features, 64, generator=g).to(dtype),
        torch.randn(64, out_features, generator=g).to(dtype).t(),
    ):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        y = linear(x, w, PackedWeight())
        assert y.shape == (rows, out_features) and y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=tol, atol=tol)


def test_pack_follows_in_place_writes_and_replaced_data() -> None:
    """Catches a stale pack: the weight written in place (optimizer step, load_state_dict) or its
    data replaced must show in the next result."""
    layer = Linear(32, 48)
    layer.pack()
    x = torch.randn(4, 32)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    torch.testing.assert_close(layer(x), 2.0 * before, rtol=1e-5, atol=1e-5)
    layer.load_state_dict({"weight": torch.zeros(48, 32)})
    assert torch.equal(layer(x), torch.zeros(4, 48))
    layer.weight.data = torch.ones(48, 32)
    torch.testing.assert_close(layer(x), x.sum(-1, keepdim=True).expand(4, 48))


def test_packed_module_copies_pickles_and_keeps_its_state_dict() -> None:
    """Catches a pack that leaks into the state dict or breaks deepcopy / pickling (Ray ships
    modules by pickle): copies compute the same result with their own pack."""
    layer = Linear(16, 8)
    layer.pack()
    x = torch.randn(3, 16)
    want = layer(x)
    assert list(layer.state_dict()) == ["weight"]
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone(x), want)


def test_packed_row_counts_reach_onednn_in_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches unbounded oneDNN kernels (one ~0.5 MB kernel per row count it sees): every decode
    row count reaches it padded to a bucket, results keep their own rows, and prefill-size inputs
    bypass the pack."""
    seen: list[int] = []
    real = linear_module._onednn

    def spy(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return real(x, packed)

    monkeypatch.setattr(linear_module, "_onednn", spy)
    w = torch.randn(40, 16)
    packed = PackedWeight()
    for rows in range(2, linear_module.MAX_PACKED_ROWS + 2):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(linear(x, w, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
    bucket = linear_module.PACKED_ROW_BUCKET
    assert set(seen) == set(range(bucket, linear_module.MAX_PACKED_ROWS + 1, bucket))


def test_row_bucket_bounds_the_row_counts_and_the_padding() -> None:
    """Catches buckets that let every row count through (one oneDNN kernel each) or that pad more
    than a quarter: multiples of 8 up to 64, then four per power of two."""
    buckets = {linear_module.row_bucket(rows) for rows in range(2, 4097)}
    assert len(buckets) == 8 + 4 * 6
    for rows in range(1, 4097):
        bucket = linear_module.row_bucket(rows)
        assert rows <= bucket <= max(rows + 7, rows * 1.25)
        assert linear_module.row_bucket(bucket) == bucket


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_row_counts_reach_f_linear_in_buckets(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a prefill chunk of a new length reaching oneDNN as a new shape (a bf16 engine grew by
    ~900 MB under random prompt lengths): every row count of 2+ rows is padded to its bucket and
    the result keeps only its own rows; fp32 (MKL) is left as it is."""
    seen: list[tuple[torch.dtype, int]] = []
    real = F.linear

    def spy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        seen.append((x.dtype, x.shape[0]))
        return real(x, w)

    monkeypatch.setattr(linear_module.F, "linear", spy)
    w = torch.randn(24, 16).to(dtype)
    for rows in (2, 5, 63, 65, 100, 300, 700):
        x = torch.randn(rows, 16).to(dtype)
        y = linear(x, w)
        assert y.shape == (rows, 24) and seen[-1] == (dtype, linear_module.row_bucket(rows))
        torch.testing.assert_close(y.float(), real(x, w).float(), rtol=2e-2, atol=2e-2)
    linear(torch.randn(300, 16), w.float())
    assert seen[-1] == (torch.float32, 300)
