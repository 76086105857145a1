"""The --help formatter of the simulation and benchmark CLIs: "(default: X)" where X says something.

Used by churn_real, bench_training, bench_inference and bench_peer.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each help, except for None and False (the help says what
    an unset option means; a flag's default is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)
