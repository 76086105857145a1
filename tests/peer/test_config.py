"""PeerConfig's quantization setting: int8 by default, every mode of swarm.quant accepted.

Tests swarm/peer/config.py (the rest of its fields are exercised through the CLI tests).
"""

import pytest

from swarm.peer.config import PeerConfig
from swarm.quant import QUANT_MODES, bytes_per_param


def test_peers_serve_int8_by_default():
    assert PeerConfig().quant == "int8"


@pytest.mark.parametrize("quant", QUANT_MODES)
def test_every_quant_mode_validates(quant):
    PeerConfig(quant=quant).validate()


def test_unknown_quant_mode_is_named():
    with pytest.raises(ValueError, match="--quant must be one of none, int8, nf4"):
        PeerConfig(quant="int3").validate()


def test_bytes_per_param_by_mode():
    assert bytes_per_param("none", 4) == 4.0 and bytes_per_param("int8", 4) == 1.0
    assert bytes_per_param("nf4", 2) < 0.56
    with pytest.raises(ValueError):
        bytes_per_param("q2", 4)


def test_torch_threads_is_bounded():
    PeerConfig(torch_threads=1).validate()
    with pytest.raises(ValueError, match="--torch-threads must be in 0..1024"):
        PeerConfig(torch_threads=-1).validate()
