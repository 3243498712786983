"""Block-wise FP8 (e4m3) weight quantization in the hub checkpoint convention.

A weight [out, in] is cut into (block_out, block_in) tiles; each tile stores float8_e4m3fn values and
one fp32 `scale_inv`, and w = fp8 * scale_inv. Edge tiles may be ragged. Both directions are
vectorised over tiles so dequantizing a 6B-parameter MoE layer costs a few tensor ops, not a loop.
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_BLOCK = (128, 128)


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
) -> torch.Tensor:
    """Return q.float() * scale_inv broadcast over (block_out, block_in) tiles, cast to `dtype`."""
    expected = scale_shape(tuple(q.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape mismatch for weight {tuple(q.shape)} with block {tuple(block)}: "
            f"expected {expected}, got {tuple(scale_inv.shape)}"
        )
    num_out, num_in = q.shape
    block_out, block_in = block
    scale_full = scale_inv.float().repeat_interleave(block_out, dim=0).repeat_interleave(block_in, dim=1)
    return (q.float() * scale_full[:num_out, :num_in]).to(dtype)


def _check_block(block: tuple[int, int]) -> None:
    if len(block) != 2 or any(int(b) != b or b <= 0 for b in block):
        raise ValueError(f"block must be two positive ints, got {block!r}")
