"""`mimo render k8s`: the Kubernetes manifests of a cluster spec; `mimo render image-ref`: the image
they run (`kubernetes.image`), which is the name and tag `scripts/image` builds.

Without `--out` it prints every object (of the spec, or of the spec with an overlay profile's
overrides) as one YAML stream for `kubectl apply -f -`; with `--out DIR` it writes the kustomize
tree (base plus every overlay), which is how the committed `k8s/` folder is made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.cli.help import DefaultsFormatter
from cluster.k8s.render import render_manifests
from cluster.k8s.tree import OVERLAYS, apply_overlay, dump_yaml, render_tree, write_tree
from cluster.spec import ClusterSpec


def add_parser(sub: argparse._SubParsersAction) -> None:
    render = sub.add_parser(
        "render", formatter_class=DefaultsFormatter, help="render deployment files from a cluster spec"
    )
    targets = render.add_subparsers(dest="target", required=True)
    k8s = targets.add_parser(
        "k8s",
        formatter_class=DefaultsFormatter,
        help="KubeRay RayService, services, policies and monitoring objects",
    )
    _add_config(k8s)
    k8s.add_argument(
        "--overlay",
        choices=list(OVERLAYS),
        default=None,
        help="apply a profile's overrides (default: none, the spec as is)",
    )
    k8s.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the kustomize tree (base + overlays) here (default: print one YAML stream)",
    )
    k8s.set_defaults(func=run_k8s)
    image = targets.add_parser(
        "image-ref",
        formatter_class=DefaultsFormatter,
        help="the container image the manifests run (kubernetes.image)",
    )
    _add_config(image)
    image.set_defaults(func=run_image_ref)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="cluster spec YAML (default: the built-in spec)"
    )


def run_image_ref(args: argparse.Namespace) -> int:
    print(ClusterSpec.load(args.config).kubernetes.image)
    return 0


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
