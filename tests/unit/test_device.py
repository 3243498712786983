"""Device choice: 'auto' follows what torch sees; a wrong or unavailable device is a clear error."""

from __future__ import annotations

import pytest
import torch

from mimo.device import device_for_gpus, pick_device


def test_auto_is_cuda_exactly_when_torch_sees_it() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_for_gpus(0) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "meta", "mps"])
def test_unknown_or_unsupported_device_names_it(name: str) -> None:
    with pytest.raises(ValueError, match=f"device '{name}'"):
        pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_asked_without_cuda_says_so() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        pick_device("cuda:1")
    with pytest.raises(ValueError, match="no CUDA device"):
        device_for_gpus(0.5)
