"""The image `k8s/` runs is real: `scripts/image` builds it offline, and `podman run` of it (its
port published on loopback only, the root filesystem read-only, as the manifests run it) serves the
embedded tiny model to the official openai client, as a non-root user.

Slow (a build of a few minutes, most of it pip): run with `scripts/test -m slow`."""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from cluster.cli.local_server import free_port
from cluster.k8s.render import RUN_AS_ID
from cluster.spec import ClusterSpec

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-image-test"


def _podman() -> list[str]:
    """podman, with what this kind of host needs: runc where the cgroups are v1/hybrid (crun refuses
    them), and ulimits no higher than this process's (the sandbox may not raise them)."""
    cmd = ["podman"]
    if shutil.which("runc") and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        cmd += ["--runtime", "runc"]
    return cmd


def _ulimits() -> list[str]:
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


@pytest.fixture(scope="module")
def image() -> str:
    started = time.monotonic()
    subprocess.run(["bash", "scripts/image"], cwd=ROOT, check=True, timeout=1800)
    ref = ClusterSpec().kubernetes.image
    size = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print(f"\nimage {ref}: {int(size) / 1e6:.0f} MB, built in {time.monotonic() - started:.0f} s")
    return ref


@pytest.fixture(scope="module")
def served(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(container id, API URL) of the image serving on a loopback port."""
    keys = tmp_path_factory.mktemp("keys")
    (keys / "api-keys").write_text(KEY + "\n")
    keys.chmod(0o755)
    (keys / "api-keys").chmod(0o644)
    port = free_port()
    run = [
        *_podman(), "run", "--rm", "-d", *_ulimits(),
        "--read-only", "--shm-size", "1g",
        "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{keys}:/etc/mimo/api-keys:ro",
        image,
        "serve", "--host", "0.0.0.0", "--api-keys-file", "/etc/mimo/api-keys/api-keys",
        "--attention-replicas", "1", "--no-dashboard",
    ]  # fmt: skip
    container = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=10)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError):
                # no listener yet, Serve's proxy before the application is deployed, or not ready
                state = subprocess.run(
                    ["podman", "inspect", "--format", "{{.State.Running}}", container],
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                assert state == "true", _logs(container)
                assert time.monotonic() < deadline, _logs(container)
                time.sleep(2)
        yield container, url
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "5", container], capture_output=True)


def _logs(container: str) -> str:
    return subprocess.run(["podman", "logs", container], capture_output=True, text=True).stdout[-4000:]


def test_the_image_serves_chat_and_streams_to_the_openai_client(served: tuple[str, str]) -> None:
    """Catches an image that does not start, lacks a dependency or the model, or cannot serve
    from a read-only root filesystem."""
    _, url = served
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="mimo-tiny", messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="mimo-tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reply.choices[0].message.content  # greedy: the stream says what the reply said
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


def test_the_container_runs_as_the_manifests_user_on_a_read_only_root(served: tuple[str, str]) -> None:
    container, _ = served
    ids = subprocess.run(
        ["podman", "exec", container, "id", "-u"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert ids == str(RUN_AS_ID)
    write = subprocess.run(["podman", "exec", container, "touch", "/app/x"], capture_output=True, text=True)
    assert write.returncode != 0 and "Read-only file system" in write.stderr


def test_k8s_runs_the_image_the_script_builds(image: str) -> None:
    """Catches manifests that name an image nothing builds (the drift test keeps k8s/ rendered
    from the default spec; this ties that spec's image to the script's)."""
    images = set()
    for path in (ROOT / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            images |= _images_in(doc)
    assert images == {image}


def _images_in(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["image"]} if isinstance(node.get("image"), str) else set()
        for value in node.values():
            found |= _images_in(value)
        return found
    if isinstance(node, list):
        return set().union(*(_images_in(v) for v in node)) if node else set()
    return set()
