"""Tests of the churn simulator's event engine: order, ties, horizon.

Run by pytest.
"""

from simulations.sim.engine import EventQueue


def test_events_run_in_time_order_and_ties_in_push_order():
    q = EventQueue()
    seen = []
    q.push(2.0, 0, 1)
    q.push(1.0, 0, 2)
    q.push(1.0, 0, 3)
    q.push(0.5, 1, 4)
    handlers = {0: lambda t, a, b: seen.append((t, a)), 1: lambda t, a, b: seen.append((t, -a))}
    assert q.run(handlers, until=10.0) == 4
    assert seen == [(0.5, -4), (1.0, 2), (1.0, 3), (2.0, 1)]


def test_handlers_can_schedule_and_horizon_stops():
    q = EventQueue()
    ticks = []

    def tick(t, a, b):
        ticks.append(t)
        q.push(t + 1.0, 0, a + 1)

    q.push(0.0, 0, 0)
    count = q.run({0: tick}, until=5.5)
    assert ticks == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and count == 6
    assert len(q) == 1 and q.now == 5.5  # the event at 6.0 waits


def test_pop_advances_now():
    q = EventQueue()
    q.push(3.0, 7, 1, 2)
    assert q.pop()[2:] == (7, 1, 2) and q.now == 3.0
