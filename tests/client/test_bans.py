"""Tests of petals_like.bans: growing ban periods and forgiveness."""

import pytest

from petals_like.bans import BanList


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(10)
def test_ban_periods_grow_and_cap():
    clock = Clock()
    bans = BanList(base_period=1.0, growth=2.0, max_period=5.0, clock=clock)
    assert bans.ban("a") == 1.0
    assert "a" in bans and "b" not in bans
    clock.now += 1.01
    assert "a" not in bans
    assert bans.ban("a") == 2.0
    assert bans.ban("a") == 4.0
    assert bans.ban("a") == 5.0  # capped
    assert bans.strikes("a") == 4
    assert bans.banned() == {"a"}


@pytest.mark.timeout(10)
def test_forgive_only_after_the_ban_ran_out():
    clock = Clock()
    bans = BanList(base_period=1.0, clock=clock)
    bans.ban("a")
    bans.forgive("a")  # still banned: a success report from a stale request must not lift it
    assert "a" in bans
    clock.now += 2
    bans.forgive("a")
    assert bans.strikes("a") == 0
    assert bans.ban("a") == 1.0


@pytest.mark.timeout(10)
def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        BanList(base_period=0)
    with pytest.raises(ValueError):
        BanList(base_period=10, max_period=5)
