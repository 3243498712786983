"""Block-wise FP8 quantization: error bounds on ragged shapes, exact dequantization, shape errors."""

import itertools

import pytest
import torch

from mimo.fp8 import FP8_MAX, dequantize_fp8_blocks, has_fp8_nan, quantize_fp8_blocks


def _naive_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for row, col in itertools.product(range(q.shape[0]), range(q.shape[1])):
        out[row, col] = q[row, col].float() * scale_inv[row // block[0], col // block[1]]
    return out


def _block_amax(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-element amax of the element's own block, by slicing (independent of the code under test)."""
    amax = torch.empty_like(weight)
    for row in range(0, weight.shape[0], block[0]):
        for col in range(0, weight.shape[1], block[1]):
            tile = weight[row : row + block[0], col : col + block[1]]
            amax[row : row + block[0], col : col + block[1]] = tile.abs().max()
    return amax


@pytest.mark.parametrize(
    ("shape", "block"),
    [((300, 200), (128, 128)), ((129, 1), (128, 128)), ((1, 257), (128, 128)), ((10, 7), (4, 3))],
)
def test_round_trip_error_bounded_by_block_amax_on_ragged_shapes(
    shape: tuple[int, int], block: tuple[int, int]
) -> None:
    """Catches ragged edge blocks read with the wrong scale (or a neighbour's amax), which blows the bound."""
    generator = torch.Generator().manual_seed(0)
    # Rows of very different magnitude make a wrong block's scale visible as a large error.
    weight = torch.randn(shape, generator=generator) * torch.logspace(-3, 2, shape[0])[:, None]
    q, scale_inv = quantize_fp8_blocks(weight, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    restored = dequantize_fp8_blocks(q, scale_inv, block)
    amax = _block_amax(weight, block)
    # e4m3: relative rounding error <= 2^-4 for normals; absolute <= 2^-10 (in scaled units) for subnormals.
    bound = weight.abs() * 2**-4 + amax / FP8_MAX * 2**-10 + 1e-12
    assert torch.isfinite(restored).all()
    assert ((restored - weight).abs() <= bound).all()


def test_scale_is_block_amax_over_448_and_exact_values_round_trip() -> None:
    """Catches a scale that is not amax/448 per block (e.g. a global scale or a transposed grid)."""
    block = (2, 2)
    # Each block's amax is 448 * scale with scale a power of two, so fp8-representable values survive exactly.
    weight = torch.tensor(
        [
            [448.0, -1.0, 896.0, 3.5],  # scales: block (0, 0) -> 1, block (0, 1) -> 2
            [0.5, 2.0, -448.0, 0.25],
            [-0.0625, 28.0, 1792.0, 0.0],  # scales: block (1, 0) -> 1/16, block (1, 1) -> 4
            [0.4375, 0.03125, 0.0, -448.0],
        ]
    )
    q, scale_inv = quantize_fp8_blocks(weight, block)
    assert scale_inv.tolist() == [[1.0, 2.0], [0.0625, 4.0]]
    assert torch.equal(dequantize_fp8_blocks(q, scale_inv, block), weight)


def test_all_zero_block_gets_finite_scale_and_dequantizes_to_zero() -> None:
    """Catches 0/0 in an all-zero block, which would put NaNs into the weight."""
    weight = torch.zeros(4, 4)
    weight[0, 0] = 896.0
    q, scale_inv = quantize_fp8_blocks(weight, (2, 2))
    assert scale_inv.tolist() == [[2.0, 1.0], [1.0, 1.0]]
    assert torch.equal(dequantize_fp8_blocks(q, scale_inv, (2, 2)), weight)


def test_dequantize_matches_naive_loop_exactly() -> None:
    """Catches a broadcast that repeats scales along the wrong axis or crops the wrong edge."""
    generator = torch.Generator().manual_seed(1)
    for shape, block in [((5, 7), (2, 3)), ((4, 6), (2, 3)), ((1, 1), (128, 128)), ((3, 9), (4, 2))]:
        q = (torch.randn(shape, generator=generator) * 100).to(torch.float8_e4m3fn)
        grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
        scale_inv = torch.rand(grid, generator=generator) + 0.1
        expected = _naive_dequantize(q, scale_inv, block)
        assert torch.equal(dequantize_fp8_blocks(q, scale_inv, block), expected)
        assert torch.equal(dequantize_fp8_blocks(q, scale_inv, block, torch.bfloat16), expected.bfloat16())


def test_scale_shape_mismatch_names_expected_and_got() -> None:
    """Catches a silent broadcast of a wrong-sized scale grid (e.g. a checkpoint with another block size)."""
    q = torch.zeros(5, 5, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"expected \(3, 3\), got \(2, 3\)"):
        dequantize_fp8_blocks(q, torch.ones(2, 3), (2, 2))


def test_rejects_non_2d_and_non_finite_weights() -> None:
    """Catches quantizing a norm vector, or an inf that would make a whole block NaN."""
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_blocks(torch.ones(8))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8_blocks(torch.tensor([[1.0, float("inf")]]))


def _reference_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """torch's own FP8 cast times the scale grid, one 2-D weight at a time (the plain formula)."""
    if q.dim() > 2:
        return torch.stack(
            [_reference_dequantize(qe, se, block) for qe, se in zip(q, scale_inv, strict=True)]
        )
    grid = scale_inv.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return q.float() * grid[: q.shape[0], : q.shape[1]]


def test_every_finite_fp8_code_converts_exactly_and_nan_codes_are_found() -> None:
    """Catches a bit-move conversion that differs from torch's cast on any code (subnormals, signed
    zero, the largest values), or a NaN check that misses a NaN code or flags a number."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(16, 16)
    expected = codes.float()
    got = dequantize_fp8_blocks(codes, torch.ones(1, 1), (16, 16))
    finite = ~expected.isnan()
    assert int(finite.sum()) == 254
    assert torch.equal(got[finite].view(torch.int32), expected[finite].view(torch.int32))  # -0.0 too
    assert not has_fp8_nan(codes[finite])
    for nan_code in (0x7F, 0xFF):
        assert has_fp8_nan(torch.tensor([0, nan_code], dtype=torch.uint8).view(torch.float8_e4m3fn))


@pytest.mark.parametrize("exponent", [-140, -100, 0, 100, 119])
def test_dequantize_equals_torch_cast_times_scale_bit_for_bit(exponent: int) -> None:
    """Catches the folded 2^8 (or a float16 step) rounding differently from q.float() * scale, at
    subnormal, tiny and huge scales."""
    generator = torch.Generator().manual_seed(exponent + 200)
    q = (torch.randn(40, 50, generator=generator) * 100).to(torch.float8_e4m3fn)
    scale_inv = (torch.rand(3, 4, generator=generator) + 1.0) * 2.0**exponent
    expected = _reference_dequantize(q, scale_inv, (16, 16))
    got = dequantize_fp8_blocks(q, scale_inv, (16, 16))
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(dequantize_fp8_blocks(q, scale_inv, (16, 16), torch.bfloat16), expected.bfloat16())


@pytest.mark.parametrize(
    ("shape", "block"),
    [((3, 1100, 1000), (128, 128)), ((300, 70, 60), (32, 48)), ((1300, 900), (128, 128))],
)
def test_tiled_stacks_equal_the_plain_formula_and_fill_a_strided_out(
    shape: tuple[int, ...], block: tuple[int, int]
) -> None:
    """Catches tiles of large weights or stacks (over a million values) read with the wrong scale
    rows, ragged last tiles cropped, or `out` written through a copy instead of the view given."""
    generator = torch.Generator().manual_seed(2)
    q = (torch.randn(shape, generator=generator) * 100).to(torch.float8_e4m3fn)
    grid = (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale_inv = torch.rand((*shape[:-2], *grid), generator=generator) + 0.1
    expected = _reference_dequantize(q, scale_inv, block)
    assert torch.equal(dequantize_fp8_blocks(q, scale_inv, block), expected)
    wide = torch.zeros((*shape[:-2], shape[-2] + 5, shape[-1]), dtype=torch.bfloat16)
    dequantize_fp8_blocks(q, scale_inv, block, out=wide[..., 5:, :])
    assert torch.equal(wide[..., 5:, :], expected.bfloat16())
    assert not wide[..., :5, :].any()
