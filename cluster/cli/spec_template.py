"""`mimo serve --spec-template`: every field of `ClusterSpec` as commented YAML, with its
description and default, ready to copy into a spec file and edit. It loads back as the default
spec (a test holds it to that), so the template cannot drift from the model."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from cluster.spec import ClusterSpec

HEADER = """\
# mimo-serve cluster spec: every field with its default. Use it with
#   mimo serve --config this.yaml        (or mimo render k8s --config this.yaml)
# Delete what you keep at the default; unknown fields are refused, naming the field.
"""


def spec_template() -> str:
    lines = [HEADER]
    default = ClusterSpec()
    for section in ClusterSpec.model_fields:
        sub = getattr(default, section)
        assert isinstance(sub, BaseModel)
        lines.append(f"{section}:  # {_doc(type(sub))}")
        for name, info in type(sub).model_fields.items():
            lines.append(f"  # {info.description or name}")
            lines.append(f"  {name}: {_yaml_value(getattr(sub, name))}")
        lines.append("")
    return "\n".join(lines)


def _doc(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().splitlines()[0]


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    return json.dumps(value)  # JSON scalars, lists and maps are YAML flow values
