"""Which torch device a model runs on: the CPU, or CUDA when it is asked for or present.

Every path of the engine, the expert shards and the samplers runs on either; this module only
resolves a user's choice ("auto", "cpu", "cuda", "cuda:N") and fails clearly when CUDA is asked
for on a host without it.
"""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """'auto' is the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch build or host has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    return device


def device_for_gpus(num_gpus: float) -> torch.device:
    """The device of a Ray actor given `num_gpus` (Ray sets CUDA_VISIBLE_DEVICES, so it is cuda:0)."""
    return pick_device("cuda" if num_gpus > 0 else "cpu")
