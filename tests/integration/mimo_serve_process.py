"""`mimo serve` run as a user runs it, for integration tests: a subprocess in its own session (so
a kill reaches the Ray cluster it starts), read until it has said where everything is."""

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
def mimo_serve(
    config: Path, *flags: str, where: dict[str, str] | None = None, timeout_s: float = 240
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Yields the process and the API URL it printed; fills `where` with the other lines it printed
    ("metrics", "dashboard", "stop": their text); kills its whole session if it is still running
    when the block ends (a test that stops it itself checks the exit)."""
    mimo = str(Path(sys.executable).parent / "mimo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never someone else's cluster
    proc = subprocess.Popen(
        [mimo, "serve", "--config", str(config), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        url, line = "", ""
        assert proc.stdout is not None
        while not line.startswith("  stop:"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "mimo serve exited early"
            assert time.monotonic() < deadline, "mimo serve did not say where it serves"
            if " at http://" in line:
                url = line.split(" at ", 1)[1].strip()
            elif line.startswith("  ") and where is not None:
                name, text = line.strip().split(":", 1)
                where[name] = text.strip()
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
