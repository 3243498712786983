"""Block-wise FP8 (e4m3) weight quantization in the hub checkpoint convention.

A weight [out, in] is cut into (block_out, block_in) tiles; each tile stores float8_e4m3fn values and
one fp32 `scale_inv`, and w = fp8 * scale_inv. Edge tiles may be ragged. Both directions are
vectorised over tiles so dequantizing a 6B-parameter MoE layer costs a few tensor ops, not a loop;
expert shards dequantize per call with the same function, so its speed is decode latency.
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_BLOCK = (128, 128)
_NAN_BITS = 0x7F  # e4m3fn's only NaN codes: S.1111.111
_SIGN_AND_E4M3_SHIFT = -16385  # 0xBFFF as int16: clears bit 14, which the sign extension sets
_E4M3_IN_F16_SCALE = 256.0  # 2^(15 - 7): float16's exponent bias over e4m3's
# Values dequantized at a time: temporaries stay in cache and get reused. On 8M-value weights a
# single pass ran at 6 ns per value here (fresh pages for each temporary), 1M-value tiles at 0.55.
_TILE_ELEMENTS = 1 << 20


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the `scale_inv` grid for a 2-D weight: one entry per (possibly ragged) block."""
    _check_block(block)
    if len(weight_shape) != 2:
        raise ValueError(f"FP8 block scaling needs a 2-D weight, got shape {tuple(weight_shape)}")
    num_out, num_in = weight_shape
    block_out, block_in = block
    return (-(-num_out // block_out), -(-num_in // block_in))


def quantize_fp8_blocks(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` [out, in] to (fp8 [out, in], fp32 scale_inv [ceil(out/bo), ceil(in/bi)])."""
    num_blocks_out, num_blocks_in = scale_shape(tuple(weight.shape), block)
    num_out, num_in = weight.shape
    block_out, block_in = block
    w = weight.float()
    # Zero padding to whole blocks never raises a block's amax, so ragged edges need no special case.
    padded = F.pad(w, (0, num_blocks_in * block_in - num_in, 0, num_blocks_out * block_out - num_out))
    tiles = padded.view(num_blocks_out, block_out, num_blocks_in, block_in)
    amax = tiles.abs().amax(dim=(1, 3))  # [num_blocks_out, num_blocks_in]
    if not torch.isfinite(amax).all():
        raise ValueError("cannot quantize a weight with non-finite values to FP8")
    # An all-zero block would otherwise get scale 0 and divide 0 by 0; any finite scale dequantizes it to 0.
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = tiles / scale_inv[:, None, :, None]
    # Rounding in the division can land a hair above 448, which e4m3fn would turn into NaN, not saturate.
    scaled = scaled.clamp(-FP8_MAX, FP8_MAX)
    q = scaled.reshape(num_blocks_out * block_out, num_blocks_in * block_in)[:num_out, :num_in]
    return q.to(FP8_DTYPE).contiguous(), scale_inv.contiguous()


def dequantize_fp8_blocks(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return q.float() * scale_inv broadcast over (block_out, block_in) tiles, cast to `dtype` (or
    written into `out`, a same-shaped tensor or view whose dtype then decides).

    Leading dims are a batch: a stack q [E, out, in] with scale_inv [E, nbo, nbi] gives, expert by
    expert, exactly what dequantizing each [out, in] alone gives. Expert shards dequantize this way
    per call, so this is decode latency: FP8 values are converted by bit moves (`_e4m3_as_f16`),
    ~7x faster on the CPU than torch's cast (one element at a time there) and exact for every finite
    value (a NaN code reads as +-480 * scale; checkpoint loading refuses NaNs: `has_fp8_nan`), and
    large weights go tile by tile (`_TILE_ELEMENTS`).
    """
    expected = (*q.shape[:-2], *scale_shape(tuple(q.shape[-2:]), block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape mismatch for weight {tuple(q.shape)} with block {tuple(block)}: "
            f"expected {expected}, got {tuple(scale_inv.shape)}"
        )
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    num_out, num_in = q.shape[-2:]
    block_out = block[0]
    q3 = q.reshape(-1, num_out, num_in)  # [B, out, in]
    scale3 = scale_inv.reshape(-1, *expected[-2:])
    out3 = out.view(-1, num_out, num_in)  # a view: the tiles below write into `out`
    if num_out * num_in <= _TILE_ELEMENTS:  # whole matrices per tile
        step = max(1, _TILE_ELEMENTS // max(1, num_out * num_in))
        for b in range(0, q3.shape[0], step):
            _dequantize_tile(q3[b : b + step], scale3[b : b + step], block, out3[b : b + step])
        return out
    rows = max(1, _TILE_ELEMENTS // num_in // block_out) * block_out  # whole blocks of rows per tile
    for b in range(q3.shape[0]):
        for r in range(0, num_out, rows):
            tile_scale = scale3[b, r // block_out : (r + rows) // block_out]
            _dequantize_tile(q3[b, r : r + rows], tile_scale, block, out3[b, r : r + rows])
    return out


def _dequantize_tile(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out: torch.Tensor
) -> None:
    """out = q.float() * scale_inv over whole tiles (q [..., out, in] starts at a block boundary)."""
    num_out, num_in = q.shape[-2:]
    block_out, block_in = block
    # The 2^8 that `_e4m3_as_f16` leaves out moves into the scales: x16 * (256 * s) is the real
    # number x * s (a power of two scales exactly), so its one rounding equals q.float() * s's.
    values = _e4m3_as_f16(q).float()  # [..., out, in]
    scale_rows = (scale_inv.float() * _E4M3_IN_F16_SCALE).repeat_interleave(block_out, dim=-2)
    scale_rows = scale_rows[..., :num_out, :]  # [..., out, nbi]
    if num_in % block_in == 0:  # each scale broadcast over its block's columns, no full-size grid
        values.view(*values.shape[:-1], num_in // block_in, block_in).mul_(scale_rows.unsqueeze(-1))
    else:
        values.mul_(scale_rows.repeat_interleave(block_in, dim=-1)[..., :num_in])
    out.copy_(values)


def has_fp8_nan(q: torch.Tensor) -> bool:
    """Whether a float8_e4m3fn tensor holds a NaN (quantize_fp8_blocks never writes one)."""
    # the NaN codes are the only ones with all seven low bits set: a max, not a compare (4x faster)
    return int((q.view(torch.uint8) & _NAN_BITS).amax()) == _NAN_BITS if q.numel() else False


def _e4m3_as_f16(q: torch.Tensor) -> torch.Tensor:
    """float16 bits that are each e4m3 value / 2^8: e4m3's sign, 4-bit exponent and 3-bit mantissa
    moved to float16's sign bit, low exponent bits and top mantissa bits. float16's exponent bias
    (15) exceeds e4m3's (7) by 8, and e4m3 subnormals land on float16 subnormals with the same
    offset, so one exact multiply by 2^8 (after a float conversion) gives the value back."""
    sign_extended = q.view(torch.int8).to(torch.int16)  # the sign also fills bits 8-15
    return ((sign_extended << 7) & _SIGN_AND_E4M3_SHIFT).view(torch.float16)


def _check_block(block: tuple[int, int]) -> None:
    if len(block) != 2 or any(int(b) != b or b <= 0 for b in block):
        raise ValueError(f"block must be two positive ints, got {block!r}")
