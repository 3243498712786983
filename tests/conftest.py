"""Process-wide settings for the test run, applied before anything imports Ray.

Ray binds to the loopback interface only when it believes it runs a single-machine cluster
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); without it a driver resolves 127.0.0.1 to the machine's
address and cannot reach a loopback-bound GCS. Token auth is off for local tests.
"""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
