"""swarm.cli's OpenMP wait policy: a bounded spin for serving and clients, PASSIVE for training,
the user's own setting kept, and a child of ours choosing again for its own role."""

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, swarm.cli; "
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
)


def _policy(*args: str, **env: str) -> tuple[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SWARM_MESH_OPENMP")
    }
    out = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**base, **env},
    )
    return tuple(out.stdout.split())


@pytest.mark.timeout(120)
def test_serving_spins_briefly_and_training_sleeps():
    assert _policy("-c", PROBE, "join") == ("None", "100000")
    assert _policy("-c", PROBE, "join", "--train", "--run-id", "r") == ("PASSIVE", "None")
    assert _policy("-c", PROBE + "  # from swarm.cli.train import main") == ("PASSIVE", "None")
    # A prompt is not the program: a client asked about the trainer still spins.
    assert _policy("-c", PROBE, "how do I run swarm-train or swarm.cli.train?") == (
        "None",
        "100000",
    )


@pytest.mark.timeout(120)
def test_the_users_setting_is_kept_and_ours_is_chosen_again_by_a_child():
    assert _policy("-c", PROBE, OMP_WAIT_POLICY="ACTIVE") == ("ACTIVE", "None")
    assert _policy("-c", PROBE, "--train", GOMP_SPINCOUNT="5") == ("None", "5")
    # What a serving parent of ours set is not the user's: a training child re-chooses.
    inherited = {"GOMP_SPINCOUNT": "100000", "SWARM_MESH_OPENMP": "1"}
    assert _policy("-c", PROBE, "--train", **inherited) == ("PASSIVE", "None")
