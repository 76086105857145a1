"""Tests of the churn simulator's network model: latency, bandwidth, queueing on each link.

Run by pytest.
"""

import pytest

from simulations.sim.network import SOURCE, Network


def net():
    return Network(4, bandwidth_mbps=80.0, latency_ms=100.0)  # 10 MB/s, 0.1 s


def test_idle_transfer_is_size_over_bandwidth_plus_latency():
    n = net()
    assert n.transfer_time(10e6) == pytest.approx(1.1)
    assert n.transfer(0, 1, 10e6, now=5.0) == pytest.approx(6.1)


def test_same_receiver_serialises():
    n = net()
    assert n.transfer(0, 2, 10e6, 0.0) == pytest.approx(1.1)
    assert n.transfer(1, 2, 10e6, 0.0) == pytest.approx(2.1)


def test_same_sender_serialises_and_disjoint_pairs_do_not():
    n = net()
    assert n.transfer(0, 1, 10e6, 0.0) == pytest.approx(1.1)
    assert n.transfer(0, 2, 10e6, 0.0) == pytest.approx(2.1)
    m = net()
    assert m.transfer(0, 1, 10e6, 0.0) == pytest.approx(1.1)
    assert m.transfer(2, 3, 10e6, 0.0) == pytest.approx(1.1)


def test_links_are_work_conserving():
    n = net()
    n.transfer(0, 1, 10e6, 0.0)  # 0's uplink busy until 1.0
    # 2 -> 1 waits only for 1's downlink; a later request never leaves a gap before it.
    assert n.transfer(2, 1, 10e6, 0.0) == pytest.approx(2.1)
    assert n.transfer(2, 3, 10e6, 3.0) == pytest.approx(4.1)  # links idle again


def test_source_and_local_and_reset():
    n = net()
    assert n.transfer(SOURCE, 1, 10e6, 0.0) == pytest.approx(1.1)
    assert n.transfer(1, 1, 10e6, 0.0) == 0.0
    assert n.transfer(0, 1, 0, 0.0) == pytest.approx(0.1)
    n.reset(1, 0.5)
    assert n.transfer(0, 1, 10e6, 0.5) == pytest.approx(1.6)
    with pytest.raises(ValueError):
        Network(2, bandwidth_mbps=0, latency_ms=1)
