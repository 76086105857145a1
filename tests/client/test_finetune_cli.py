"""Tests of petals_like.finetune_cli and petals_like.finetune: flags, files, token windows."""

from __future__ import annotations

import pytest

from petals_like.finetune import TokenWindows, tokenize_files
from petals_like.finetune_cli import parse_args
from swarm.errors import BadRequest

MADDR = "/ip4/127.0.0.1/tcp/4000/p2p/12D3KooWRSrtAgMjDciZ9gDyPK1Qe69UHzHKZw9i5ipozd7DvF1L"


def test_flags_come_from_the_configs():
    a = parse_args(
        [
            "--initial-peers",
            MADDR,
            "--data",
            "a.txt",
            "b.txt",
            "--method",
            "ptune",
            "--steps",
            "5",
            "--rank",
            "4",
            "--lr",
            "0.01",
            "--save",
            "out",
        ]
    )
    assert a.initial_peers == [MADDR] and a.data == ["a.txt", "b.txt"]
    assert (a.method, a.steps, a.rank, a.lr, a.save) == ("ptune", 5, 4, 0.01, "out")
    assert a.targets == ["q_proj", "v_proj"] and a.batch_size == 4


def test_a_file_after_the_multiaddrs_goes_back_to_data():
    a = parse_args(["--initial-peers", MADDR, "/data/text.txt", "--steps", "2"])
    assert a.initial_peers == [MADDR] and a.data == ["/data/text.txt"]


@pytest.mark.parametrize(
    "argv,message",
    [(["--data", "a.txt"], "--initial-peers"), (["--initial-peers", MADDR], "--data")],
)
def test_missing_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_token_windows(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefgh" * 20)
    ids = tokenize_files([str(tmp_path / "t.txt")], None, 50)
    assert len(ids) == 160 and max(ids) < 50
    w = TokenWindows(ids, 8, 0.25, seed=0)
    assert w.batch(3).shape == (3, 8)
    assert len(w.held) == 40 and w.heldout_batches(2)[0].shape == (2, 8)
    with pytest.raises(BadRequest, match="too few"):
        TokenWindows(ids[:10], 8, 0.1, seed=0)
