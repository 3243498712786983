"""The `mimo` command line tells a newcomer what it does without reading the code: every flag of
every subcommand has help text that shows its default; `mimo serve`'s flags override the spec
field they name; `--spec-template` is the whole spec, commented, and loads back as the default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from cluster.cli.main import build_parser, main
from cluster.cli.serve import spec_of
from cluster.spec import ClusterSpec, SpecError


def _parsers(
    parser: argparse.ArgumentParser, name: str = "mimo"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_flag_has_help_that_shows_its_default() -> None:
    """Catches a flag added without help, or one whose default a user cannot see in --help."""
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help, f"{name} {flag} has no help"
            if action.required or not action.option_strings or action.nargs == 0:
                continue  # required, positional or on/off: there is no default to show
            shown = parser.formatter_class(prog=name)._get_help_string(action)  # type: ignore[attr-defined]
            assert "default" in shown, f"{name} {flag}: help does not show the default ({shown!r})"
            assert (shown % vars(action)).split("default")[0] in " ".join(text.split()), flag


def test_the_spec_template_is_every_field_commented_and_loads_as_the_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Catches a template that drifts from the spec model: a field missing, undescribed, or a
    default that does not load back as the built-in spec's."""
    assert main(["serve", "--spec-template"]) == 0
    text = capsys.readouterr().out
    assert ClusterSpec.from_dict(yaml.safe_load(text)) == ClusterSpec()
    comments: dict[tuple[str, str], str] = {}  # (section, field) -> the comment line above it
    section, previous = "", ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":")[0]
        elif line.startswith("  ") and not line.startswith("  #"):
            comments[(section, line.split(":")[0].strip())] = previous
        previous = line
    for name in ClusterSpec.model_fields:
        for field, info in type(getattr(ClusterSpec(), name)).model_fields.items():
            assert info.description, f"{name}.{field} has no description"
            assert comments[(name, field)] == f"  # {info.description}", f"{name}.{field}"


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_serve_flags_override_the_fields_they_name(tmp_path: Path) -> None:
    """Catches a flag that is parsed but not applied, applied to the wrong field, or that leaves
    autoscaling bounds contradicting it."""
    config = tmp_path / "spec.yaml"
    config.write_text(
        "gateway:\n  port: 9000\nattention:\n  num_replicas: 3\n  min_replicas: 3\n  max_replicas: 6\n"
    )
    assert spec_of(_serve_args("--config", str(config))).gateway.port == 9000
    spec = spec_of(
        _serve_args(
            "--config", str(config), "--port", "9001", "--model", "/models/x", "--api-keys-file", "/keys",
            "--host", "0.0.0.0", "--attention-replicas", "1", "--expert-shards", "4", "--mtp", "2",
            "--metrics-port", "9100",
        )
    )  # fmt: skip
    assert (spec.gateway.port, spec.gateway.host, spec.gateway.api_keys_file) == (9001, "0.0.0.0", "/keys")
    assert spec.model.path == "/models/x"
    assert (spec.attention.min_replicas, spec.attention.num_replicas, spec.attention.max_replicas) == (
        1,
        1,
        6,
    )
    assert (spec.experts.num_shards, spec.engine.num_mtp_drafts, spec.observability.metrics_port) == (
        4,
        2,
        9100,
    )
    assert spec_of(_serve_args("--attention-replicas", "8")).attention.max_replicas == 8


def test_a_bad_flag_value_names_the_spec_field() -> None:
    with pytest.raises(SpecError, match=r"engine\.num_mtp_drafts"):
        spec_of(_serve_args("--mtp", "7"))


def test_serving_off_loopback_without_keys_is_refused() -> None:
    """Catches a gateway bound to every interface with no API keys: private by default."""
    with pytest.raises(SpecError, match="api_keys_file"):
        spec_of(_serve_args("--host", "0.0.0.0"))
    assert spec_of(_serve_args("--host", "::1")).gateway.host == "::1"
