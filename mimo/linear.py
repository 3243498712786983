"""`linear` and `Linear`: y = x @ W.T, laid out for the decode step's few rows on the CPU.

A decode step multiplies a handful of rows by every weight of the model, and between two uses of a
layer the rest of the model has passed through the cache (the tiny model alone is 48 MB in fp32, the
L3 here 32 MB), so each matmul reads its weight from memory. For fp32 with 2-32 rows MKL's
x @ W.T reads a cold weight slowly; W @ x.T (the weight as the long left operand) streams it 1.4-3x
faster. Measured here (2 cores, each weight evicted before its call, median of 3 x 60): lm_head
[4096, 256] at 8 rows 838 -> 365 us, at 32 rows 1,291 -> 928 us; [896, 256] at 8 rows 196 -> 91 us;
with one thread the gain holds up to 8 rows (835 -> 558 us) and turns into a loss at 16 (976 ->
1,033 us). In the engine, two interleaved A/Bs in one process (median step): a batch-8 fp32 decode
step 10.9 -> 9.5 and 13.0 -> 10.1 ms, batch 32 16.4 -> 15.6 and 17.2 -> 17.2 ms. bf16 weights
gain nothing this way (x @ W.T already streams them at ~10 GB/s), nor does one row or a prefill
chunk, nor CUDA: those take `F.linear`.

One row of a small bf16/fp16 weight (batch-1 decode: the experts, projections, dense MLP) takes
ATen's own gemv with oneDNN switched off for the call: oneDNN costs ~25 us per call whatever the
size, its gemv 6-16 us here for the tiny model's [192, 256] / [256, 96] / [256, 384] weights
(27 -> 10 us hot for the first). Large weights (the [960, 256] fused QKV, lm_head) gain nothing,
and two or more rows are 2-4x slower without oneDNN, so both keep `F.linear`. The switch is
process-wide for the call's duration; another thread's matmul in that window takes ATen's kernel
too, which changes only its speed.

The result equals `F.linear` up to the order of float additions (a different kernel), as any change
of batch size already gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# most rows that take W @ x.T, by intra-op threads (see the module docstring)
MAX_ROWS_ONE_THREAD = 8
MAX_ROWS_THREADS = 32
# largest low-precision weight (elements) a single row multiplies by with ATen's gemv
MAX_GEMV_ELEMENTS = 1 << 17
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, in] (or any shape [..., in]) @ weight.T -> contiguous [N, out]."""
    if x.dim() == 2 and x.device.type == "cpu":
        rows = x.shape[0]
        if x.dtype == torch.float32:  # the thread count is asked only where it decides
            if 2 <= rows <= MAX_ROWS_ONE_THREAD or (
                MAX_ROWS_ONE_THREAD < rows <= MAX_ROWS_THREADS and torch.get_num_threads() > 1
            ):
                return torch.mm(weight, x.t()).t().contiguous()
        elif rows == 1 and x.dtype in _LOW_PRECISION and weight.numel() <= MAX_GEMV_ELEMENTS:
            return _gemv(x, weight)
    return F.linear(x, weight)


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, in] @ weight.T by ATen's gemv: oneDNN off for this one call (module docstring)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return torch.mv(weight, x[0]).unsqueeze(0)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


class Linear(nn.Linear):
    """A bias-free `nn.Linear` (same parameter, same state-dict key) computed by `linear`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
