"""Ray's token auth for every cluster `mimo serve` starts or joins: private by default.

Serve replicas listen for inter-deployment calls on every interface (Ray binds `[::]:0` itself),
and that channel runs what it is sent; with `RAY_AUTH_MODE=token` every such call, and every GCS,
raylet and dashboard call, must carry the cluster's token. A cluster we start gets a fresh token
in a 0600 file in a 0700 directory; every process Ray starts inherits the path through the
environment. Joining a cluster takes its token from the environment or a file, never runs without.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where `ray get-auth-token` keeps one


class RayAuthError(RuntimeError):
    """Token auth cannot be set up as asked; the message says what to set."""


@dataclass(frozen=True)
class ClusterToken:
    """A token file made for one cluster; `remove()` deletes it (and its directory) at shutdown."""

    path: Path

    def remove(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def new_cluster_token(parent: Path | None = None) -> ClusterToken:
    """Makes a fresh 256-bit token for a cluster this process is about to start and points this
    process's environment (so every process Ray starts) at it. Any token set for another cluster
    is dropped from the environment: it takes precedence over the path in Ray's loader."""
    _refuse_disabled("starting a cluster")
    directory = Path(tempfile.mkdtemp(prefix="mimo-ray-auth-", dir=parent))  # mode 0700
    path = directory / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ[MODE_ENV] = "token"
    os.environ.pop(TOKEN_ENV, None)
    os.environ[TOKEN_PATH_ENV] = str(path)
    return ClusterToken(path)


def use_join_token(token_file: Path | None) -> None:
    """Token auth for joining a running cluster: the token from `token_file`, else
    `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or Ray's default file. Raises RayAuthError when there
    is none or when auth was switched off, rather than join without it."""
    _refuse_disabled("joining a cluster")
    if token_file is not None:
        _check_token_file(token_file)
        os.environ.pop(TOKEN_ENV, None)
        os.environ[TOKEN_PATH_ENV] = str(token_file)
    elif os.environ.get(TOKEN_ENV):
        pass
    elif os.environ.get(TOKEN_PATH_ENV):
        _check_token_file(Path(os.environ[TOKEN_PATH_ENV]))
    elif DEFAULT_TOKEN_FILE.is_file():
        _check_token_file(DEFAULT_TOKEN_FILE)
    else:
        raise RayAuthError(
            "no Ray auth token: pass --ray-token-file, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            "to the cluster's token (`ray get-auth-token` on its head node prints it)"
        )
    os.environ[MODE_ENV] = "token"


def _refuse_disabled(action: str) -> None:
    if os.environ.get(MODE_ENV, "token").lower() != "token":
        raise RayAuthError(
            f"{MODE_ENV}={os.environ[MODE_ENV]}: mimo serve keeps Ray's token auth on when {action} "
            "(without it, anyone who reaches a Serve replica's port runs code in the cluster); unset it"
        )


def _check_token_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise RayAuthError(f"Ray auth token file {path}: {e.strerror}") from None
    if not text:
        raise RayAuthError(f"Ray auth token file {path} is empty")
    if mode & stat.S_IRWXO:  # group access is how Kubernetes shares a mounted Secret (fsGroup)
        raise RayAuthError(f"Ray auth token file {path} is open to other users; chmod 600 it")
