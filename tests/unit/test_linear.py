"""mimo.linear: the decode-step layout gives F.linear's result, contiguous, for every row count and
thread setting, and `Linear` is an `nn.Linear` with the same state-dict key."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimo.linear import MAX_ROWS_ONE_THREAD, MAX_ROWS_THREADS, Linear, linear


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
