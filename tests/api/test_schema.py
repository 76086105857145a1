"""Request bodies: OpenAI's defaults, bounds, and what the mesh refuses to pretend to do.

Tests petals_like/api/schema.py.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from petals_like.api.schema import MAX_CHOICES, ChatMessage, ChatRequest, CompletionRequest


def test_defaults_follow_openai():
    r = CompletionRequest(model="m", prompt="hi")
    assert (r.max_tokens, r.temperature, r.top_p, r.n, r.stream) == (16, 1.0, 1.0, 1, False)
    c = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert c.token_limit() is None  # the server's default applies
    c = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=7)
    assert c.token_limit() == 7
    c = ChatRequest(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=7,
        max_completion_tokens=3,
    )
    assert c.token_limit() == 3  # the newer name wins
    assert CompletionRequest(model="m", prompt="x", stop="\n").stop_list() == ["\n"]
    assert CompletionRequest(model="m", prompt="x", user="u", metadata={}).model == "m"


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 2.5},
        {"top_p": 1.5},
        {"n": MAX_CHOICES + 1},
        {"max_tokens": -1},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": [""]},
    ],
)
def test_out_of_bounds_fields_are_refused(body):
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", **body)


def test_unsupported_parameters_are_named_not_ignored():
    assert CompletionRequest(model="m", prompt="x").unsupported() is None
    assert CompletionRequest(model="m", prompt="x", logprobs=2).unsupported()[0] == "logprobs"
    assert CompletionRequest(model="m", prompt="x", presence_penalty=1).unsupported()[0] == (
        "presence_penalty"
    )
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[{}])
    assert chat.unsupported()[0] == "tools"


def test_message_content_parts_join_and_images_are_refused():
    m = ChatMessage(
        role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    )
    assert m.text() == "ab"
    with pytest.raises(ValueError, match="text"):
        ChatMessage(role="user", content=[{"type": "image_url"}]).text()
    with pytest.raises(ValidationError):
        ChatMessage(role="tool", content="x")
