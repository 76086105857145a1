"""Temporary folders of the simulations (simulations/scratch.py): gone however the block ends."""

from __future__ import annotations

import os
import signal

import pytest

from simulations.scratch import scratch_dir


def test_folder_is_removed_on_an_exception() -> None:
    with pytest.raises(RuntimeError), scratch_dir("t_") as path:
        (path / "log").write_text("x")
        raise RuntimeError("boom")
    assert not path.exists()


def test_sigterm_unwinds_like_ctrl_c_and_removes_the_folder() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), scratch_dir("t_") as path:
        os.kill(os.getpid(), signal.SIGTERM)
    assert not path.exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_folder_the_user_named_is_kept(tmp_path) -> None:
    with scratch_dir("t_", tmp_path / "logs") as path:
        (path / "log").write_text("x")
    assert (tmp_path / "logs" / "log").exists()
