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

A weight can also carry a `PackedWeight`: oneDNN's blocked copy, made once, which decode-size row
counts (2-64, and one row of a large weight) then use. F.linear and MKL re-lay a plain weight out
on every call; a packed one is read as it lies. Measured here (each weight evicted before its call): bf16
lm_head [4096, 256] at 8 rows 408 -> 243 us, the stacked experts [3072, 256] 338 -> 192 us; fp32
712 -> 353 us and 494 -> 303 us (W @ x.T included); equal or faster at every row count up to
2,048 hot. The pack doubles the memory of the weights packed.

Low-precision matmuls on the CPU run in oneDNN, which compiles and caches a kernel for every
shape it sees (~0.5-1 MB each, up to 1,024 of them). A server's row counts change with every
prefill chunk and every expert's share of it: under prompts of random lengths a bf16 engine grew
from 0.4 to 1.4 GB, one kernel per (rows, weight shape), while fp32 (MKL, nothing cached per shape)
stayed flat. So every low-precision matmul of 2+ rows here sees a bucketed row count
(`row_bucket`: multiples of 8 up to 64, then 4 steps per power of two, at most 25% padding), padded
with zero rows; each weight shape then gets a few dozen kernels at most, reused ever after.

The result equals `F.linear` up to the order of float additions (a different kernel), as any change
of batch size already gives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# most rows that take W @ x.T, by intra-op threads (see the module docstring)
MAX_ROWS_ONE_THREAD = 8
MAX_ROWS_THREADS = 32
# largest low-precision weight (elements) a single row multiplies by with ATen's gemv
MAX_GEMV_ELEMENTS = 1 << 17
# Packed weights serve 2..MAX_PACKED_ROWS rows (decode batches), padded with zero rows to a multiple
# of PACKED_ROW_BUCKET: oneDNN keeps a compiled kernel of ~0.5 MB per (row count, weight) it has
# seen, up to 1,024 of them, so a server's ever-changing row counts would grow the process by
# hundreds of MB; buckets bound it to 9 kernels per weight. More rows take F.linear, bucketed too.
MAX_PACKED_ROWS = 64
PACKED_ROW_BUCKET = 8
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_PACKABLE = (torch.float32, torch.bfloat16)


class PackedWeight:
    """oneDNN's blocked copy of one CPU weight, made on first use and again whenever the weight
    changes (written in place, which bumps its version, or replaced): it never serves stale values.
    Copies and pickles carry no pack (they make their own)."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._packed: torch.Tensor | None = None

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu" and weight.dtype in _PACKABLE and torch.backends.mkldnn.is_available()
        )

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        if self._packed is None or key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._key = key
        return self._packed

    def __deepcopy__(self, memo: dict[int, object]) -> PackedWeight:
        return PackedWeight()

    def __getstate__(self) -> dict[str, object]:
        return {"_key": None, "_packed": None}


def maybe_packed(weight: torch.Tensor) -> PackedWeight | None:
    """A `PackedWeight` where oneDNN can pack `weight` (CPU, fp32 or bf16), else None."""
    return PackedWeight() if PackedWeight.supports(weight) else None


def row_bucket(rows: int) -> int:
    """The row count a low-precision CPU matmul of `rows` rows runs at (module docstring):
    multiples of PACKED_ROW_BUCKET up to MAX_PACKED_ROWS, then a quarter of the power of two below."""
    step = PACKED_ROW_BUCKET if rows <= MAX_PACKED_ROWS else 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` [N, ...] with zero rows appended up to `rows` (x itself when N == rows)."""
    extra = rows - x.shape[0]
    return x if extra == 0 else F.pad(x, (0, 0) * (x.dim() - 1) + (0, extra))


def runs_in_onednn(x: torch.Tensor) -> bool:
    """Low precision on the CPU: oneDNN runs matmuls of `x`, compiling a kernel per shape (module
    docstring), so their row counts must be bucketed, or the matmul moved off oneDNN."""
    return x.device.type == "cpu" and x.dtype in _LOW_PRECISION


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None = None) -> torch.Tensor:
    """x [N, in] (or any shape [..., in]) @ weight.T -> [N, out] (rows contiguous); `packed`: the
    weight's pack, used for 2..MAX_PACKED_ROWS rows, or one row of a weight too large for the gemv."""
    if x.dim() == 2 and x.device.type == "cpu":
        rows = x.shape[0]
        if packed is not None and x.dtype == weight.dtype:
            if 1 < rows <= MAX_PACKED_ROWS:
                return _bucketed(x, lambda padded: _onednn(padded, packed.get(weight)))
            if rows == 1 and weight.numel() > MAX_GEMV_ELEMENTS:
                return _onednn(x, packed.get(weight))
        if x.dtype == torch.float32:  # the thread count is asked only where it decides
            if 2 <= rows <= MAX_ROWS_ONE_THREAD or (
                MAX_ROWS_ONE_THREAD < rows <= MAX_ROWS_THREADS and torch.get_num_threads() > 1
            ):
                return torch.mm(weight, x.t()).t().contiguous()
        elif x.dtype in _LOW_PRECISION:
            if rows == 1:
                return _gemv(x, weight) if weight.numel() <= MAX_GEMV_ELEMENTS else F.linear(x, weight)
            return _bucketed(x, lambda padded: F.linear(padded, weight))
    return F.linear(x, weight)


def _bucketed(x: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`matmul` of `x` run at `row_bucket` rows, the padding rows' results dropped."""
    rows = x.shape[0]
    bucket = row_bucket(rows)
    return matmul(x) if bucket == rows else matmul(pad_rows(x, bucket))[:rows]


def _onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, in] @ weight.T by ATen's gemv: oneDNN off for this one call (module docstring)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return torch.mv(weight, x[0]).unsqueeze(0)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


class Linear(nn.Linear):
    """A bias-free `nn.Linear` (same parameter, same state-dict key) computed by `linear`, with its
    weight packed once `pack()` is called (the paged forward does, on the CPU)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.packed: PackedWeight | None = None

    def pack(self) -> None:
        self.packed = maybe_packed(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed)
