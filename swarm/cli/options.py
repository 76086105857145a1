"""One options builder: argparse flags generated from a config dataclass, so the two never disagree.

Used by the `swarm-peer join`, `swarm-train` and `swarm-generate` (its sampling flags) CLIs.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields


def _base_type(hint: object) -> object:
    """`int` of `int | None`; the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """A `--field-name` flag per field of dataclass `cls`, with its default and type.

    Help comes from the field's `metadata["help"]`; every field must have one.
    `metadata["choices"]` limits the values. Booleans become switches, lists take several values,
    `X | None` takes an X. The default is shown unless it is None or the help already says it.
    """
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        text = f.metadata.get("help")
        if not text:
            raise ValueError(f"{cls.__name__}.{f.name} has no help text")
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        hint = _base_type(hints[f.name])
        if hint is bool:
            parser.add_argument(flag, action="store_true", help=text)
        elif typing.get_origin(hint) is list:
            parser.add_argument(flag, nargs="*", default=default, help=text)
        else:
            kind = hint if hint in (int, float) else str
            choices = f.metadata.get("choices")
            if default is not None and "default" not in text:
                text = f"{text} (default: {default})"
            parser.add_argument(
                flag,
                type=kind,
                default=default,
                choices=choices,
                metavar="{" + ",".join(map(str, choices)) + "}" if choices else None,
                help=text,
            )


def config_from_args(cls: type, args: argparse.Namespace):
    """An instance of dataclass `cls` from the flags `add_config_options` made."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
