"""The subset of kustomize that `k8s/` uses, for machines without `kubectl`: `resources` (files and
folders with their own kustomization) and `patches` holding inline RFC 6902 operations aimed at
one object by kind and name. Anything else in a kustomization raises, so the subset cannot drift
silently; `test_manifests` checks it against `kubectl kustomize` wherever kubectl exists.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "patches"}


def build(folder: Path) -> list[Obj]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization fields {sorted(unknown)}")
    objs: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objs += build(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for patch in spec.get("patches", []):
        if set(patch) != {"target", "patch"} or set(patch["target"]) - {"kind", "name"}:
            raise NotImplementedError(f"{folder}: only inline patches aimed by kind and name")
        matches = [
            i for i, o in enumerate(objs)
            if o["kind"] == patch["target"]["kind"] and o["metadata"]["name"] == patch["target"]["name"]
        ]  # fmt: skip
        if not matches:
            raise ValueError(f"{folder}: patch target {patch['target']} matches no object")
        for i in matches:
            objs[i] = apply_json_patch(objs[i], yaml.safe_load(patch["patch"]))
    return objs


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 `add`, `remove` and `replace` on a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [_unescape(t) for t in op["path"].split("/")[1:]]
        node = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "remove":
                del node[index]
            elif kind == "replace":
                node[index] = op["value"]
            else:
                raise NotImplementedError(kind)
        else:
            if kind in ("remove", "replace") and last not in node:
                raise KeyError(f"{op['path']} does not exist")
            if kind in ("add", "replace"):
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            else:
                raise NotImplementedError(kind)
    return doc
