"""The engine's pure parts: stop sequences cut streamed text exactly, token budgets.

Tests petals_like/api/engine.py (its generations run against real peers in test_scenario_api).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from petals_like.api.engine import StopScanner, token_budget
from swarm.errors import BadRequest

text = st.text(alphabet="abc\n", max_size=40)


def stream(scanner: StopScanner, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        sent, hit = scanner.feed(piece)
        out.append(sent)
        if hit:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


@given(text, st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3), max_size=3), st.data())
def test_streamed_text_is_the_text_cut_before_the_first_stop(body, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    sent, hit = stream(StopScanner(stops), pieces)
    hits = [i for i in (body.find(s) for s in stops) if i >= 0]
    # Pieces are final once sent: a stop found later never takes back text already sent.
    assert (sent, hit) == ((body[: min(hits)], True) if hits else (body, False))


def test_a_possible_stop_is_held_back_until_it_is_decided():
    s = StopScanner(["</end>"])
    assert s.feed("hello </e") == ("hello ", False)
    assert s.feed("x") == ("</ex", False)
    assert s.feed(" </en") == (" ", False)
    assert s.feed("d>tail") == ("", True)


def test_budget_is_what_was_asked_or_the_default_within_the_context():
    assert token_budget(10, 5, 100, 50) == 5
    assert token_budget(10, None, 100, 50) == 50
    assert token_budget(80, None, 100, 50) == 20  # no limit given: cut to what fits
    assert token_budget(10, 0, 100, 50) == 0
    with pytest.raises(BadRequest, match="maximum context length is 100 tokens"):
        token_budget(80, 30, 100, 50)  # asked for more than fits: refused, as OpenAI does
    with pytest.raises(BadRequest, match="context"):
        token_budget(100, None, 100, 50)
    with pytest.raises(BadRequest, match="empty"):
        token_budget(0, 5, 100, 50)
