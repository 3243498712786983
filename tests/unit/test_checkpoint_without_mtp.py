"""Checkpoints without MTP tensors: what transformers' `save_pretrained` writes serves without MTP.

transformers 5.23 has no MTP blocks, so a MiMo checkpoint it saves holds no `model.mtp.*` tensor,
and a hub config.json may carry no `num_nextn_predict_layers` (the release's 3 are then assumed).
Such a checkpoint loads with one warning and generates exactly as the original; asking it for MTP
drafts fails with a message naming the checkpoint, in the engine, the CLI and the cluster spec check.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cluster.cli.main import EMBEDDED_MODEL, main
from cluster.serving.app import check_engine_fits
from cluster.spec import ClusterSpec, SpecError
from mimo.checkpoint import CheckpointError, write_checkpoint
from mimo.config import MiMoConfig
from mimo.config_export import to_hub_dict
from mimo.tokenizer import Tokenizer
from mimo.weights import MTP_PREFIX, checkpoint_config, hub_state_from_model, load_model
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from tests.factory import random_config_dict, random_model, write_random_checkpoint

transformers = pytest.importorskip("transformers")

PROMPT = "def fib(n):"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint read by transformers' MiMoV2FlashForCausalLM and saved again by it, with
    `num_nextn_predict_layers` removed from config.json, as the released config.json has none."""
    path = tmp_path_factory.mktemp("saved_by_transformers")
    model = transformers.MiMoV2FlashForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32)
    model.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = list(f.keys())
    assert stored and not [n for n in stored if n.startswith(MTP_PREFIX)]  # transformers drops them
    config = json.loads((path / "config.json").read_text())
    config.pop("num_nextn_predict_layers", None)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        (path / name).write_bytes((EMBEDDED_MODEL / name).read_bytes())
    return path


def _mimo_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith("mimo") and r.levelno >= logging.WARNING
    ]


def _greedy_ids(capsys: pytest.CaptureFixture[str], model: Path, *extra: str) -> list[int]:
    argv = ["generate", "--model", str(model), "--prompt", PROMPT, "--max-tokens", "24", "--json", *extra]
    assert main(argv) == 0
    ids: list[int] = json.loads(capsys.readouterr().out)["token_ids"]
    assert len(ids) == 24
    return ids


def test_transformers_checkpoint_loads_without_mtp_and_warns_once(
    saved_by_transformers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a transformers-saved checkpoint failing with '42 missing: model.mtp.layers.0...', and
    the fallback being silent or warning once per missing tensor instead of once."""
    assert MiMoConfig.from_file(saved_by_transformers).num_mtp_layers == 3  # declared by default
    with caplog.at_level(logging.WARNING):
        model = load_model(saved_by_transformers)
    (warning,) = _mimo_warnings(caplog)
    assert str(saved_by_transformers) in warning and "MTP drafting is unavailable" in warning
    assert model.config.num_mtp_layers == 0 and len(model.model.mtp.layers) == 0
    assert checkpoint_config(saved_by_transformers).num_mtp_layers == 0


def test_transformers_checkpoint_generates_as_the_original(
    saved_by_transformers: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Catches the no-MTP fallback changing the main model: `mimo generate` greedy output on the
    transformers-saved copy must equal the original tiny checkpoint's, token for token."""
    with caplog.at_level(logging.WARNING):
        ids = _greedy_ids(capsys, saved_by_transformers)
    assert len(_mimo_warnings(caplog)) == 1
    assert ids == _greedy_ids(capsys, EMBEDDED_MODEL)
    assert ids == _greedy_ids(capsys, EMBEDDED_MODEL, "--mtp", "2")  # drafts never change greedy output


def test_engine_refuses_mtp_drafts_without_mtp_blocks(saved_by_transformers: Path) -> None:
    """Catches an engine asked for MTP drafts on a checkpoint without MTP blocks starting anyway, or
    refusing without a ValueError that names the setting and the checkpoint."""
    model = load_model(saved_by_transformers)
    tokenizer = Tokenizer.from_dir(saved_by_transformers)
    message = f"engine.num_mtp_drafts=2 but checkpoint {saved_by_transformers} has no MTP blocks"
    with pytest.raises(ValueError, match=re.escape(message)):
        Engine(model, tokenizer, EngineConfig(num_mtp_drafts=2))
    Engine(model, tokenizer, EngineConfig(num_mtp_drafts=0))


def test_cli_mtp_on_checkpoint_without_mtp_is_one_line(
    saved_by_transformers: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches `mimo generate --mtp 2` on a checkpoint without MTP blocks ending in a traceback."""
    argv = ["generate", "--model", str(saved_by_transformers), "--prompt", PROMPT, "--mtp", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimo generate: error: engine.num_mtp_drafts=2 but checkpoint ")
    assert "has no MTP blocks" in err and err.count("\n") == 1


def test_spec_check_refuses_mtp_drafts_before_ray_starts(saved_by_transformers: Path) -> None:
    """Catches a cluster spec asking for MTP drafts on a checkpoint without MTP blocks passing the
    pre-deploy check (every attention replica would then fail to start, forever) or being blamed on
    engine.kv_cache_mib."""

    def spec(path: Path, drafts: int) -> ClusterSpec:
        return ClusterSpec.model_validate(
            {"model": {"path": str(path)}, "engine": {"num_mtp_drafts": drafts}}
        )

    with pytest.raises(SpecError, match="has no MTP blocks") as err:
        check_engine_fits(spec(saved_by_transformers, 2))
    assert err.value.field == "engine.num_mtp_drafts"
    check_engine_fits(spec(saved_by_transformers, 0))
    check_engine_fits(spec(EMBEDDED_MODEL, 2))  # the original has its 3 MTP blocks


def test_checkpoint_missing_one_mtp_tensor_still_fails(tmp_path: Path) -> None:
    """Catches the no-MTP fallback accepting a corrupt checkpoint that lost only some MTP tensors."""
    config = MiMoConfig.from_hub_dict(random_config_dict(num_layers=2))
    state = hub_state_from_model(random_model(config))
    lost = "model.mtp.layers.1.mlp.up_proj.weight"
    del state[lost]
    write_checkpoint(tmp_path, state)
    (tmp_path / "config.json").write_text(json.dumps(to_hub_dict(config)))
    with pytest.raises(CheckpointError, match=f"1 missing: {re.escape(lost)}$"):
        load_model(tmp_path)
    assert checkpoint_config(tmp_path).num_mtp_layers == 3


def test_config_without_mtp_blocks_loads_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Catches a checkpoint whose config declares 0 MTP blocks (num_nextn_predict_layers: 0) being
    warned about as if it had lost them."""
    write_random_checkpoint(tmp_path, random_config_dict(num_layers=2, num_nextn_predict_layers=0))
    with caplog.at_level(logging.WARNING):
        model = load_model(tmp_path)
    assert _mimo_warnings(caplog) == [] and len(model.model.mtp.layers) == 0


def test_spec_check_blames_a_bad_config_on_model_path(tmp_path: Path) -> None:
    """Catches a config.json the loader rejects being reported as `engine.kv_cache_mib` too small."""
    (tmp_path / "config.json").write_text(json.dumps(random_config_dict(model_type="qwen3_moe")))
    spec = ClusterSpec.model_validate({"model": {"path": str(tmp_path)}})
    with pytest.raises(SpecError, match="model_type") as err:
        check_engine_fits(spec)
    assert err.value.field == "model.path"
