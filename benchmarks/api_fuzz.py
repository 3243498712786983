"""Fuzzing the OpenAI API for crashes and hangs: every request must be answered within 30 s, with no
5xx, always as JSON that our OpenAPI schema documents.

Two fuzzers over real HTTP against the gateway app (the tiny model in process, a short context so
any one request's work is bounded):
- schemathesis from our own `/openapi.json`: examples, coverage (boundary values), fuzzing and a
  stateful phase (GET /v1/models -> a completion with the listed model, through the schema's
  OpenAPI links), valid and invalid inputs (`--mode all`); its HAR report is read for the counts;
- a byte-level fuzz of JSON bodies (hypothesis): valid requests mutated byte by byte (flips,
  insertions, deletions, truncation), random JSON values in known fields (lone surrogates, huge
  numbers, deep nesting) and plain random bytes, to both completion endpoints.

`python -m benchmarks.api_fuzz` runs both at full size and writes `benchmarks/results/api_fuzz.json`;
`tests/unit/test_api_fuzz.py` runs them smaller in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "mimo-tiny"
MAX_RESPONSE_S = 30.0


@dataclass
class FuzzReport:
    """What one fuzzer sent and what came back."""

    fuzzer: str
    num_requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    max_response_s: float = 0.0
    num_over_limit: int = 0  # slower than MAX_RESPONSE_S, or no answer at all
    num_server_errors: int = 0  # any 5xx
    failures: list[str] = field(default_factory=list)  # what each bad answer was (first few)
    exit_code: int | None = None  # schemathesis' own verdict (its checks), where it ran

    def count(self, status: int | None, elapsed_s: float, what: str) -> None:
        self.num_requests += 1
        key = "no answer" if status is None else str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        self.max_response_s = max(self.max_response_s, round(elapsed_s, 3))
        bad = status is None or elapsed_s > MAX_RESPONSE_S
        self.num_over_limit += bad
        self.num_server_errors += status is not None and status >= 500
        if (bad or (status is not None and status >= 500)) and len(self.failures) < 20:
            self.failures.append(f"{key} after {elapsed_s:.1f} s: {what[:300]}")


@contextmanager
def local_gateway(max_model_len: int = 48) -> Iterator[str]:
    """The gateway app over the tiny model in this process, at a loopback URL (…/v1)."""
    import torch

    from cluster.cli.local_server import LocalServer
    from gateway.config import GatewayConfig
    from mimo.tokenizer import Tokenizer
    from mimo.weights import load_model
    from replicas.engine.async_engine import AsyncEngine
    from replicas.engine.engine import Engine
    from replicas.engine.engine_config import EngineConfig

    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_dir(TINY)
    config = EngineConfig(kv_cache_bytes=16 * 2**20, max_model_len=max_model_len, max_num_batched_tokens=256)
    engine = Engine(load_model(TINY), tokenizer, config)
    server = LocalServer.start(
        AsyncEngine(engine), tokenizer, GatewayConfig("mimo-tiny", max_model_len=max_model_len)
    )
    try:
        yield server.url
    finally:
        server.stop()


def run_schemathesis(url: str, max_examples: int, seed: int, report_dir: Path) -> FuzzReport:
    """schemathesis' CLI against `url`'s schema; its checks decide `exit_code`, its HAR the counts."""
    har = report_dir / "schemathesis.har"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        url.removesuffix("/v1") + "/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(max_examples),
        "--request-timeout",
        str(MAX_RESPONSE_S),
        "--max-response-time",
        str(MAX_RESPONSE_S),
        "--seed",
        str(seed),
        "--generation-database",
        "none",
        "--report",
        "har",
        "--report-har-path",
        str(har),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    report = FuzzReport("schemathesis", exit_code=done.returncode)
    for entry in json.loads(har.read_text())["log"]["entries"]:
        status = int(entry["response"]["status"]) or None  # HAR writes 0 for no response
        what = f"{entry['request']['method']} {entry['request']['url']}"
        report.count(status, float(entry["time"]) / 1000, what)
    if done.returncode != 0:
        report.failures.append(done.stdout[-3000:] + done.stderr[-1000:])
    return report


VALID_BODIES = [
    (
        "/chat/completions",
        {"model": "mimo-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    ),
    (
        "/chat/completions",
        {
            "model": "mimo-tiny",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    },
                }
            ],
            "max_tokens": 4,
            "stream": True,
            "n": 2,
        },
    ),
    ("/completions", {"model": "mimo-tiny", "prompt": ["def f(", "x"], "max_tokens": 3, "logprobs": 2}),
    ("/completions", {"model": "mimo-tiny", "prompt": [1, 2, 3], "max_tokens": 2, "echo": True}),
]

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None), max_size=20),  # surrogates included
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def fuzzed_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(path, body): a valid request with a field set to a random JSON value, then 0-4 byte
    mutations; or a deep nesting bomb; or random bytes."""
    path, valid = draw(st.sampled_from(VALID_BODIES))
    kind = draw(st.sampled_from(["field", "field", "bytes", "nesting", "random"]))
    if kind == "random":
        return path, draw(st.binary(max_size=200))
    if kind == "nesting":
        depth = draw(st.integers(min_value=100, max_value=200_000))
        return path, b"[" * depth + b"]" * draw(st.integers(min_value=0, max_value=depth))
    body = dict(valid)
    if kind == "field":
        key = draw(
            st.sampled_from([*body, "n", "stop", "seed", "temperature", "stream_options", "tool_choice"])
        )
        body[key] = draw(_json_value)
    data = bytearray(
        json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")
    )
    for _ in range(draw(st.integers(min_value=0, max_value=4) if kind == "bytes" else st.just(0))):
        at = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
        else:
            del data[at:]
    return path, bytes(data)


def run_byte_fuzz(url: str, num_examples: int, seed: int) -> FuzzReport:
    """`num_examples` fuzzed bodies, one at a time, each answer timed; streams are read to the end."""
    report = FuzzReport("bytes")
    client = httpx.Client(timeout=MAX_RESPONSE_S + 5)

    @fixed_seed(seed)
    @settings(
        max_examples=num_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=fuzzed_bodies())
    def send(case: tuple[str, bytes]) -> None:
        path, body = case
        started = time.monotonic()
        try:
            with client.stream(
                "POST", url + path, content=body, headers={"content-type": "application/json"}
            ) as response:
                text = response.read().decode("utf-8", "replace")
                status: int | None = response.status_code
                if response.headers.get("content-type", "").split(";")[0] not in (
                    "application/json",
                    "text/event-stream",
                ):
                    report.failures.append(f"{status} not JSON: {text[:200]}")
        except httpx.HTTPError as e:
            status, text = None, f"{type(e).__name__}: {e}"
        report.count(status, time.monotonic() - started, f"{path} {body[:200]!r} -> {text[:200]}")

    send()
    client.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemathesis-examples", type=int, default=200)
    parser.add_argument("--byte-examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "api_fuzz.json")
    args = parser.parse_args()
    report_dir = Path("/tmp") / f"mimo-api-fuzz-{os.getpid()}"
    report_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with local_gateway() as url:
        reports = [
            run_schemathesis(url, args.schemathesis_examples, args.seed, report_dir),
            run_byte_fuzz(url, args.byte_examples, args.seed),
        ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    out: dict[str, Any] = {
        "commit": commit.stdout.strip(),
        "wall_s": round(time.monotonic() - started, 1),
        "max_response_limit_s": MAX_RESPONSE_S,
        "reports": [asdict(r) for r in reports],
        "total_requests": sum(r.num_requests for r in reports),
        "total_server_errors": sum(r.num_server_errors for r in reports),
        "total_over_limit": sum(r.num_over_limit for r in reports),
        "statuses": dict(sum((Counter(r.statuses) for r in reports), Counter())),
        "schemathesis_checks_passed": reports[0].exit_code == 0,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "reports"}, indent=2))


if __name__ == "__main__":
    main()
