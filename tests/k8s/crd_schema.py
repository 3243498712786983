"""Strict validation of custom resources against a vendored CRD's `openAPIV3Schema`.

The API server prunes unknown fields of a custom resource silently, so a misspelt field would
deploy and do nothing; here every object schema that lists its properties rejects others (as
`kubernetes-validate --strict` does for built-in kinds), `nullable` is honoured, list-map keys must
be unique, and `metadata` is checked against the real ObjectMeta. CEL rules
(`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parents[2] / "k8s" / "schemas"
K8S_VERSION = "1.32.0"  # the Kubernetes API the built-in kinds are validated against


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _unique_list_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate list-map key {dict(zip(keys, key, strict=True))}")
        seen.add(key)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
)


@functools.cache
def _object_meta_schema() -> dict[str, Any]:
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = f"v{K8S_VERSION}-local-strict"
    definitions = json.loads((root / folder / "_definitions.json").read_text())
    meta = copy.deepcopy(definitions["$defs"]["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"])
    return {**meta, "$defs": definitions["$defs"]}


@functools.cache
def crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a validator, for every CRD file in k8s/schemas/."""
    validators = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = _Validator(schema)
    return validators


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one custom resource, as 'path: message' lines."""
    validator = crd_validators()[(obj["apiVersion"], obj["kind"])]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    meta = jsonschema.Draft202012Validator(_object_meta_schema())
    errors += [
        f"metadata/{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in meta.iter_errors(obj["metadata"])
    ]
    return errors
