"""Tests of petals_like.distributed_cli: exit codes and messages when the swarm cannot be used."""

import argparse
import time

import pytest

from petals_like.distributed_cli import add_distributed_arguments, run_distributed
from swarm.cli.console import run_main


def args_for(model_dir, peers):
    return argparse.Namespace(
        prompt="hello",
        model=str(model_dir),
        initial_peers=peers,
        max_new_tokens=4,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        seed=0,
        chat=False,
        compression="none",
        link_delay=0.0,
    )


@pytest.mark.timeout(120)
def test_unreachable_swarm_exits_1_with_a_message(tiny_model_dir, capsys):
    bogus = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRSrtAgMjDciZ9gDyPK1Qe69UHzHKZw9i5ipozd7DvF1L"
    t0 = time.monotonic()
    code = run_main("swarm-generate", lambda: run_distributed(args_for(tiny_model_dir, [bogus])))
    assert code == 1 and time.monotonic() - t0 < 90
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("swarm-generate: error: could not reach any of --initial-peers")


@pytest.mark.timeout(10)
def test_distributed_flags():
    p = argparse.ArgumentParser()
    add_distributed_arguments(p)
    a = p.parse_args(["--compression", "none", "--link-delay", "0.05", "--link-bandwidth", "20"])
    assert (a.compression, a.link_delay, a.link_bandwidth) == ("none", 0.05, 20.0)
    assert p.parse_args(["--adapter", "dir"]).adapter == "dir"
    assert p.parse_args([]).compression == "auto" and p.parse_args([]).adapter is None
    # Push is the default, as RouterConfig's; --no-push relays every hop through the client.
    from petals_like.router import RouterConfig

    assert p.parse_args([]).no_push is not RouterConfig.push
    assert p.parse_args(["--no-push"]).no_push
    assert p.parse_args([]).no_direct is not RouterConfig.direct
    assert p.parse_args(["--no-direct"]).no_direct
