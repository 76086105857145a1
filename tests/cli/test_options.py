"""The one options builder: flags, defaults and help generated from a config dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from swarm.cli.options import add_config_options, config_from_args
from swarm.peer.config import PeerConfig
from swarm.training.trainer import TrainerConfig


@dataclass
class Example:
    count: int = field(default=3, metadata={"help": "how many"})
    ratio: float = field(default=0.5, metadata={"help": "a share"})
    name: str | None = field(default=None, metadata={"help": "a name"})
    limit: int | None = field(default=None, metadata={"help": "a bound"})
    items: list[str] = field(default_factory=list, metadata={"help": "several"})
    quiet: bool = field(default=False, metadata={"help": "a switch"})


def parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_config_options(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def test_types_defaults_and_switches_come_from_the_dataclass():
    assert parse(Example, []) == Example()
    got = parse(Example, ["--count", "7", "--limit", "2", "--items", "a", "b", "--quiet"])
    assert got == Example(count=7, limit=2, items=["a", "b"], quiet=True)
    with pytest.raises(SystemExit):
        parse(Example, ["--count", "seven"])


def test_every_cli_config_has_help_and_the_cli_keeps_its_defaults():
    assert parse(TrainerConfig, []) == TrainerConfig()
    assert parse(PeerConfig, []) == PeerConfig()
    assert parse(PeerConfig, ["--min-gain", "0.5"]).min_gain == 0.5

    @dataclass
    class Silent:
        x: int = 1

    with pytest.raises(ValueError, match="no help"):
        parse(Silent, [])


def test_help_shows_defaults_and_choices_but_not_none():
    @dataclass
    class Choosy:
        quant: str = field(
            default="none", metadata={"help": "weights", "choices": ("none", "int8")}
        )
        span: int | None = field(default=None, metadata={"help": "blocks (default: all)"})
        rate: float = field(default=0.5, metadata={"help": "a rate"})

    parser = argparse.ArgumentParser()
    add_config_options(parser, Choosy)
    text = " ".join(parser.format_help().split())
    assert "--quant {none,int8} weights (default: none)" in text
    assert "(default: all)" in text and "None" not in text
    assert "a rate (default: 0.5)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--quant", "int4"])
