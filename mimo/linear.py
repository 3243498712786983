"""`linear` and `Linear`: y = x @ W.T, laid out for the decode step's few rows on the CPU.

A decode step multiplies a handful of rows by every weight of the model, and between two uses of a
layer the rest of the model has passed through the cache, so each matmul reads its weight from
memory. Three CPU paths follow from that (numbers in `benchmarks/NOTES.md`):
- fp32 with 2-32 rows computes W @ x.T (the weight as the long left operand), which streams a cold
  weight 1.4-3x faster than MKL's x @ W.T; bf16, one row, prefill chunks and CUDA take `F.linear`;
- one row of a small bf16/fp16 weight takes ATen's gemv with oneDNN switched off for the call
  (oneDNN costs ~25 us per call whatever the size); the switch is process-wide for the call's
  duration, so another thread's matmul in that window takes ATen's kernel too (only its speed
  changes);
- a weight may carry a `PackedWeight` (oneDNN's blocked copy, made once, twice the memory), which
  decode-size row counts (2-64, and one row of a large weight) read as it lies.

oneDNN compiles and caches a kernel for every shape it sees, so every low-precision matmul of 2+
rows sees a bucketed row count (`row_bucket`: multiples of 8 up to 64, then 4 steps per power of
two, at most 25% padding), padded with zero rows: each weight shape gets a few dozen kernels at
most, and a server's memory stays flat under prompts of any length.

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
