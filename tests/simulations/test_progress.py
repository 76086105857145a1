"""The stderr heartbeat of the simulations (simulations/progress.py): said at once, repeated
while nothing changes."""

from __future__ import annotations

import time

from simulations.progress import Progress


def test_status_is_printed_at_once_and_repeated_while_nothing_changes(capfd) -> None:
    count = [0]
    with Progress("bench", every=0.2) as progress:
        progress.update("starting peers")
        time.sleep(0.7)
        progress.update(lambda: f"step {count[0]}")
        count[0] = 3
        time.sleep(0.5)
        progress.update("generating", repeat=False)
        time.sleep(0.5)
    lines = capfd.readouterr().err.splitlines()
    starting = [x for x in lines if "bench: starting peers" in x]
    assert len(starting) >= 2 and starting[1].endswith(" s)")  # repeated, with its age
    assert any("bench: step 3" in x for x in lines)  # a callable status is read at each beat
    assert len([x for x in lines if "generating" in x]) == 1
