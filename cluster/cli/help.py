"""Help text conventions of the `mimo` command line: every flag says what it does and its default.

`DefaultsFormatter` appends "(default: X)" to a flag whose default is a value; a flag whose default
is None says in its own words what none means ("default: ..."), and an on/off flag is off unless
given. `tests/unit/test_cli_help.py` holds every subcommand to this."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        no_value = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or no_value or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"
