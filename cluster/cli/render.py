"""`mimo render k8s`: the Kubernetes manifests of a cluster spec.

Without `--out` it prints every object (of the spec, or of the spec with an overlay profile's
overrides) as one YAML stream for `kubectl apply -f -`; with `--out DIR` it writes the kustomize
tree (base plus every overlay), which is how the committed `k8s/` folder is made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.k8s.render import render_manifests
from cluster.k8s.tree import OVERLAYS, apply_overlay, dump_yaml, render_tree, write_tree
from cluster.spec import ClusterSpec


def add_parser(sub: argparse._SubParsersAction) -> None:
    render = sub.add_parser("render", help="render deployment files from a cluster spec")
    targets = render.add_subparsers(dest="target", required=True)
    k8s = targets.add_parser("k8s", help="KubeRay RayService, services, policies and monitoring objects")
    k8s.add_argument("--config", type=Path, default=None, help="cluster spec YAML (default: built-in)")
    k8s.add_argument("--overlay", choices=list(OVERLAYS), default=None, help="apply a profile's overrides")
    k8s.add_argument("--out", type=Path, default=None, help="write the kustomize tree (base + overlays) here")
    k8s.set_defaults(func=run_k8s)


def run_k8s(args: argparse.Namespace) -> int:
    spec = ClusterSpec.load(args.config)
    if args.out is not None:
        if args.overlay is not None:
            raise ValueError("--out writes every overlay; drop --overlay (or --out to print one)")
        for path in write_tree(render_tree(spec), args.out):
            print(path)
        return 0
    if args.overlay is not None:
        spec = apply_overlay(spec, args.overlay)
    print(dump_yaml(render_manifests(spec)), end="")
    return 0
