"""Process-wide settings for the test run, applied before anything imports Ray.

Ray binds to the loopback interface only when it believes it runs a single-machine cluster
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); without it a driver resolves 127.0.0.1 to the machine's
address and cannot reach a loopback-bound GCS. Token auth stays on, as in production: Serve
replicas listen on every interface, so the test clusters get a token of their own
(`cluster.serving.ray_auth`), removed when the run ends.
"""

import atexit
import os

from cluster.serving.ray_auth import new_cluster_token

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_AUTH_MODE", None)  # a test run never runs its clusters without auth
atexit.register(new_cluster_token().remove)
