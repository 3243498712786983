"""Ray token auth set-up for the clusters `mimo serve` starts and joins (`cluster.serving.ray_auth`)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cluster.serving import ray_auth
from cluster.serving.ray_auth import RayAuthError, new_cluster_token, use_join_token


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_auth, "DEFAULT_TOKEN_FILE", tmp_path / "no-default-token")
    return monkeypatch


def test_new_cluster_token_is_private_fresh_and_handed_to_children(clean_env: pytest.MonkeyPatch) -> None:
    """Catches a token others can read, one reused between clusters, or a stale RAY_AUTH_TOKEN
    (which wins over the path in Ray's loader) left in the environment."""
    import os

    clean_env.setenv("RAY_AUTH_TOKEN", "another-clusters-token")
    first, second = new_cluster_token(), new_cluster_token()
    try:
        assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ
        assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(second.path)
        assert stat.S_IMODE(second.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(second.path.parent.stat().st_mode) == 0o700
        assert len(second.path.read_text()) == 64 and first.path.read_text() != second.path.read_text()
    finally:
        first.remove()
        second.remove()
    assert not first.path.parent.exists()


def test_auth_switched_off_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches `RAY_AUTH_MODE=disabled` in the user's environment silently opening the cluster."""
    clean_env.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RayAuthError, match="keeps Ray's token auth on when starting a cluster"):
        new_cluster_token(tmp_path)
    with pytest.raises(RayAuthError, match="when joining a cluster"):
        use_join_token(None)


def test_joining_needs_a_readable_private_token(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches joining a cluster without a token, or with an empty or world-readable token file."""
    import os

    with pytest.raises(RayAuthError, match="no Ray auth token: pass --ray-token-file"):
        use_join_token(None)
    token = tmp_path / "token"
    token.write_text("")
    token.chmod(0o600)
    with pytest.raises(RayAuthError, match="is empty"):
        use_join_token(token)
    token.write_text("abc\n")
    token.chmod(0o644)
    with pytest.raises(RayAuthError, match="open to other users; chmod 600"):
        use_join_token(token)
    with pytest.raises(RayAuthError, match="No such file"):
        use_join_token(tmp_path / "missing")
    token.chmod(0o640)  # group-readable, as a Kubernetes Secret mounted with fsGroup
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    use_join_token(token)
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token) and "RAY_AUTH_TOKEN" not in os.environ
    assert os.environ["RAY_AUTH_MODE"] == "token"
    clean_env.delenv("RAY_AUTH_TOKEN_PATH")
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    use_join_token(None)  # the environment's token
    assert os.environ["RAY_AUTH_TOKEN"] == "from-env"
