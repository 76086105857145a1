"""The FastAPI app: OpenAI's routes over an Engine, errors in OpenAI's shape, and the dashboard.

Used by `swarm-api` (petals_like.api.cli) and the API's tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from petals_like.api.engine import Engine, Job, Outcome
from petals_like.api.schema import (
    MAX_PROMPTS,
    ChatRequest,
    CompletionRequest,
    error_body,
    usage,
)
from swarm.errors import BadRequest, CacheFull, NoRoute, PeerUnavailable, SwarmError
from swarm.generation import SamplingConfig

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, status: int, message: str, type_: str, param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def _swarm_error(e: SwarmError) -> ApiError:
    if isinstance(e, BadRequest):
        return ApiError(400, str(e), "invalid_request_error")
    if isinstance(e, (NoRoute, PeerUnavailable, CacheFull)):
        return ApiError(503, f"the swarm cannot serve this now: {e}", "server_error")
    return ApiError(500, str(e), "server_error")


def create_app(
    engine: Engine,
    model_id: str,
    aliases: tuple[str, ...] = (),
    dashboard: Callable | None = None,
) -> FastAPI:
    """The app serving `model_id` (requests may also name it by `aliases`).

    dashboard: an async source of swarm snapshots (swarm.dashboard.web.CachedSnapshot): serves
    the page at `/` and its data at `/api/swarm`.
    """
    app = FastAPI(title="Swarm Mesh OpenAI-compatible API")
    created = int(time.time())
    names = {model_id, *aliases}

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            message, param = f"the request body is not valid JSON ({reason})", None
        else:
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            param = ".".join(loc) or None
            message = first.get("msg", "invalid request body")
            if param:
                message = f"{param}: {message}"
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code)

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(
                404,
                f"the model {name!r} does not exist here; this server serves {model_id!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "swarm-mesh"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    def jobs_for(req, prompts: list[list[int]], limit: int | None) -> list[Job]:
        bad = req.unsupported()
        if bad:
            raise ApiError(400, bad[1], "invalid_request_error", bad[0])
        jobs = []
        for prompt in prompts:
            budget = engine.budget(len(prompt), limit)
            for k in range(req.n):
                # top_p 0 (allowed by OpenAI) keeps only the most likely token: greedy.
                greedy = req.temperature == 0 or req.top_p == 0
                seed = None if req.seed is None else req.seed + k
                sampling = SamplingConfig(
                    temperature=0.0 if greedy else req.temperature,
                    top_p=1.0 if greedy else req.top_p,
                    seed=seed,
                )
                jobs.append(Job(prompt, budget, sampling, req.stop_list()))
        return jobs

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        try:
            prompts = _completion_prompts(engine, req.prompt)
            jobs = jobs_for(req, prompts, req.max_tokens)
        except SwarmError as e:
            raise _swarm_error(e) from e
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = _echo_texts(engine, req, prompts)

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": req.model,
                "choices": [
                    {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                ],
            }

        if req.stream:
            opening = [(i, text) for i, text in enumerate(prefix) if text]
            return _sse(_events(engine, jobs, req, chunk, opening, lambda text: text, ""))
        outcomes = await _collect(engine, jobs, request)
        choices = [
            {
                "index": i,
                "text": prefix[i] + o.text,
                "logprobs": None,
                "finish_reason": o.finish_reason,
            }
            for i, o in sorted(outcomes.items())
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": req.model,
            "choices": choices,
            "usage": _usage(outcomes, req.n),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        try:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages
            ]
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", "messages") from e
        try:
            jobs = jobs_for(req, [engine.chat_prompt(messages)], req.token_limit())
        except SwarmError as e:
            raise _swarm_error(e) from e
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict, finish: str | None) -> dict:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": req.model,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        if req.stream:
            opening = [(i, {"role": "assistant", "content": ""}) for i in range(len(jobs))]
            return _sse(_events(engine, jobs, req, chunk, opening, lambda t: {"content": t}, {}))
        outcomes = await _collect(engine, jobs, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": None,
                "finish_reason": o.finish_reason,
            }
            for i, o in sorted(outcomes.items())
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": req.model,
            "choices": choices,
            "usage": _usage(outcomes, req.n),
        }

    if dashboard is not None:
        from swarm.dashboard.web import dashboard_router

        async def source() -> dict:
            snap = await dashboard()
            server = {
                "requests_served": engine.served,
                "active_requests": engine.active,
                "tokens_generated": engine.tokens,
            }
            return {**snap, "server": server}

        app.include_router(dashboard_router(source))
    return app


def _completion_prompts(engine: Engine, prompt) -> list[list[int]]:
    """OpenAI's four prompt forms (text, texts, token ids, lists of token ids) as id lists."""
    if isinstance(prompt, str):
        prompts = [engine.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [engine.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise BadRequest("prompt must be a string, a list of strings, or token ids")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts in one request")
    vocab = engine.model.config.vocab_size
    for p in prompts:
        if any(t < 0 or t >= vocab for t in p):
            raise BadRequest(f"token ids must be in 0..{vocab - 1}")
    return prompts


def _echo_texts(engine: Engine, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
    """Per choice: the prompt's text when `echo` asks for it, else ""."""
    texts = []
    for p in prompts:
        text = ""
        if req.echo:
            text = req.prompt if isinstance(req.prompt, str) else engine.tokenizer.decode(p)
        texts.extend([text] * req.n)
    return texts


def _usage(outcomes: dict[int, Outcome], n: int) -> dict:
    # Choices are laid out prompt by prompt, n each: count each prompt once, as OpenAI does.
    prompt = sum(o.prompt_tokens for i, o in outcomes.items() if i % n == 0)
    return usage(prompt, sum(len(o.token_ids) for o in outcomes.values()))


async def _collect(engine: Engine, jobs: list[Job], request: Request) -> dict[int, Outcome]:
    """Every job's Outcome; stops them all if the client disconnects while waiting."""
    outcomes: dict[int, Outcome] = {}

    async def run() -> None:
        async for i, item in engine.stream(jobs):
            if not isinstance(item, str):
                outcomes[i] = item

    task = asyncio.ensure_future(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                logger.info("client left: its generation stopped")
                raise ApiError(499, "client closed the request", "invalid_request_error")
        task.result()
    except SwarmError as e:
        raise _swarm_error(e) from e
    finally:
        if not task.done():
            task.cancel()
    return outcomes


async def _events(
    engine: Engine,
    jobs: list[Job],
    req,
    chunk: Callable[[int, Any, str | None], dict],
    opening: list[tuple[int, Any]],
    content: Callable[[str], Any],
    empty: Any,
) -> AsyncIterator[dict]:
    """A streamed response's chunks: `opening`, then each choice's text as it comes and its
    finish reason, then (with stream_options.include_usage) a chunk with the usage only."""
    outcomes: dict[int, Outcome] = {}
    for i, payload in opening:
        yield chunk(i, payload, None)
    async for i, item in engine.stream(jobs):
        if isinstance(item, str):
            yield chunk(i, content(item), None)
        else:
            outcomes[i] = item
            yield chunk(i, empty, item.finish_reason)
    if req.stream_options and req.stream_options.include_usage:
        yield {**chunk(0, empty, None), "choices": [], "usage": _usage(outcomes, req.n)}


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`; errors as a last event."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n".encode()
        except SwarmError as e:
            err = _swarm_error(e)
            yield f"data: {json.dumps(err.body)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
