"""`mimo serve` run as a user runs it, for integration tests: a subprocess in its own session (so
a kill reaches the Ray cluster it starts), read until it prints its URL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def mimo_serve(config: Path, timeout_s: float = 240) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Yields the process and the URL it printed; kills its whole session if it is still running
    when the block ends (a test that stops it itself checks the exit)."""
    mimo = str(Path(sys.executable).parent / "mimo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never someone else's cluster
    proc = subprocess.Popen(
        [mimo, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        line = ""
        assert proc.stdout is not None
        while "at http://" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "mimo serve exited early"
            assert time.monotonic() < deadline, "mimo serve did not print its URL"
        yield proc, line.split(" at ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
