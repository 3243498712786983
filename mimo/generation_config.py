"""The sampling defaults a checkpoint's authors ship in `generation_config.json`, read as vLLM and
SGLang read them: temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens as the
default output cap. A missing file or key means no default (the API's own applies); `do_sample` and
the rest of the file are not sampling defaults and are ignored, as those servers do.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # the file's max_new_tokens

    def present(self) -> dict[str, float | int]:
        """The defaults the checkpoint sets, by API field name."""
        return {k: v for k, v in asdict(self).items() if v is not None}


NO_DEFAULTS = SamplingDefaults()


def read_sampling_defaults(model_dir: str | Path) -> SamplingDefaults:
    """The defaults in `model_dir/generation_config.json` (none when the file is absent). Raises
    ValueError naming the key when a value has the wrong type."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return SamplingDefaults()
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")

    def number(key: str) -> float | None:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{path}: {key} must be a number, got {value!r}")
        return None if value is None else float(value)

    def integer(key: str) -> int | None:
        value: Any = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{path}: {key} must be an integer, got {value!r}")
        return value

    return SamplingDefaults(
        temperature=number("temperature"),
        top_p=number("top_p"),
        top_k=integer("top_k"),
        min_p=number("min_p"),
        repetition_penalty=number("repetition_penalty"),
        max_tokens=integer("max_new_tokens"),
    )
