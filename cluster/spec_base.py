"""What every cluster-spec section shares: frozen, unknown fields rejected, and `SpecError`, the
error that names the dotted path of the value at fault."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecError(ValueError):
    """A cluster spec that cannot be used; `field` is the dotted path of the value at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SpecSection(BaseModel):
    """A section of the spec: frozen; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
