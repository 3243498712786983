"""The `mimo` CLI on bad input: one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli.main import EMBEDDED_MODEL, main
from tests.factory import random_config_dict, write_random_checkpoint


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimo ") and err.count("\n") == 1
    return err


def test_inspect_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches the documented JSON keys of `mimo inspect` disappearing or changing meaning."""
    assert main(["inspect", str(EMBEDDED_MODEL), "--context", "4096", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params", "mtp_params", "kv_bytes_per_token", "kv_bytes_hybrid"):
        assert key in r
    assert r["kv_bytes_all_global"] == 6 * 4096 * 2 * 2 * (48 + 32)
    assert r["kv_bytes_hybrid"] == 2 * 4096 * 2 * 2 * (48 + 32) + 4 * 65 * 4 * 2 * (48 + 32)


def test_unknown_model_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a non-MiMo checkpoint being loaded as if it were one."""
    (tmp_path / "config.json").write_text(json.dumps(random_config_dict(model_type="qwen3_moe")))
    assert "model_type" in _error(capsys, ["inspect", str(tmp_path)])


def test_missing_checkpoint_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a typo'd --model path producing a traceback instead of a message."""
    assert "config.json" in _error(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])


def test_prompt_longer_than_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches prompts past max_position_embeddings running with garbage positions."""
    write_random_checkpoint(tmp_path, random_config_dict(max_position_embeddings=16))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((EMBEDDED_MODEL / name).read_text())
    err = _error(capsys, ["generate", "--model", str(tmp_path), "--prompt", "word " * 40])
    assert "max_position_embeddings" in err


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--max-tokens", "0", "max_tokens"),
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top_p"),
    ],
)
def test_invalid_sampling_values(
    flag: str, value: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches invalid sampling values being accepted silently."""
    assert field in _error(capsys, ["generate", "--prompt", "hi", flag, value])


def test_generate_with_an_unknown_device_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["generate", "--prompt", "hi", "--max-tokens", "2", "--device", "gpu0"])
    assert "device 'gpu0'" in err
