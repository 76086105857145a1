"""Runs the API's generations on the swarm: one session per choice, in threads, cancellable.

Used by petals_like.api.app. Concurrent requests share the swarm: each has its own session, and
the peers batch the steps of all sessions that arrive together.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from swarm.errors import BadRequest
from swarm.generation import SamplingConfig, eos_ids
from swarm.model.tokenizer import StreamDecoder

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The caller went away: the generation stops at its next token and frees its session."""


class _StopMatched(Exception):
    """A stop sequence appeared: generation ends here (finish_reason "stop")."""


def token_budget(prompt_len: int, asked: int | None, context: int, default: int) -> int:
    """New tokens for a prompt: `asked`, or `default` cut to the context when not given.

    Raises BadRequest for an empty prompt or one that, with `asked`, does not fit the context
    (OpenAI refuses such a request rather than cutting it).
    """
    if prompt_len == 0:
        raise BadRequest("the prompt is empty")
    room = context - prompt_len
    if room <= 0 or (asked is not None and asked > room):
        want = prompt_len + (asked or 0)
        raise BadRequest(
            f"this model's maximum context length is {context} tokens; the request needs "
            f"{want} ({prompt_len} in the prompt, {asked or 0} for the completion)"
        )
    return min(default, room) if asked is None else asked


class StopScanner:
    """Cuts streamed text at the first stop sequence, holding back what may start one.

    feed(piece) -> (text safe to send now, whether a stop sequence was reached).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:  # the longest tail of the text that a stop sequence starts with
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if s.startswith(self.pending[-k:]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Job:
    """One choice to generate: prompt token ids, how many new tokens at most, how to sample."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """What a job produced: its text (as streamed), token ids and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of text or a stop sequence) or "length"
    prompt_tokens: int


class Engine:
    """Generations through one DistributedModelForCausalLM, at most `max_concurrent` at a time.

    default_max_tokens: new tokens when a chat request gives no limit (peers reserve cache for
        the whole session, so "until the context is full" would ask for far too much).
    """

    def __init__(self, model, max_concurrent: int = 16, default_max_tokens: int = 512):
        self.model = model
        self.tokenizer = model.tokenizer
        self.context = model.config.max_position_embeddings
        self.default_max_tokens = default_max_tokens
        self.eos = set(eos_ids(self.tokenizer, model.config))
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="swarm-api")
        self._lock = threading.Lock()
        self.active = 0  # choices being generated now
        self.served = 0  # choices finished (any outcome)
        self.tokens = 0  # tokens generated, all choices together

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer: send token ids as the prompt")
        return self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model has no chat template: use /v1/completions")
        return self.encode(self.tokenizer.apply_chat_template(messages))

    def budget(self, prompt_len: int, asked: int | None) -> int:
        return token_budget(prompt_len, asked, self.context, self.default_max_tokens)

    # ---- generation --------------------------------------------------------------------------
    def run(self, job: Job, emit: Callable[[str], None], cancelled: threading.Event) -> Outcome:
        """Generate `job` on the calling thread; `emit` gets text pieces as they are final."""
        if cancelled.is_set():
            raise Cancelled()
        if job.max_new_tokens == 0:
            return Outcome("", [], "length", len(job.prompt_ids))
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        scanner = StopScanner(job.stop)
        ids: list[int] = []
        pieces: list[str] = []
        finish = "length"

        def send(piece: str) -> None:
            if piece:
                pieces.append(piece)
                emit(piece)

        def on_token(nxt) -> None:
            nonlocal finish
            if cancelled.is_set():
                raise Cancelled()
            token = int(nxt[0])
            ids.append(token)
            if token in self.eos:
                finish = "stop"  # the loop ends by itself after an end-of-text token
                return
            if decoder is None:
                return
            piece, hit = scanner.feed(decoder.push(token))
            send(piece)
            if hit:
                finish = "stop"
                raise _StopMatched()

        s = job.sampling
        session = self.model.inference_session(len(job.prompt_ids) + job.max_new_tokens)
        with self._lock:
            self.active += 1
        try:
            self.model.generate(
                [job.prompt_ids],
                job.max_new_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                seed=s.seed,
                session=session,
                on_token=on_token,
            )
            if decoder is not None:
                piece, hit = scanner.feed(decoder.flush())
                send(piece)
                if hit:
                    finish = "stop"
                else:
                    send(scanner.flush())
        except _StopMatched:
            pass
        finally:
            with self._lock:
                self.active -= 1
                self.served += 1
                self.tokens += len(ids)
            session.close()
        return Outcome("".join(pieces), ids, finish, len(job.prompt_ids))

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[int, str | Outcome]]:
        """Run `jobs` at once; yields (index, text piece) as they come and (index, Outcome) last.

        Closing the iterator early (the client left) cancels every job still running.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        futures = []
        for i, job in enumerate(jobs):

            def emit(piece: str, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, piece))

            fut = loop.run_in_executor(self._pool, self.run, job, emit, cancelled)
            # Scheduled after the job's last emit: pieces and the end arrive in order.
            fut.add_done_callback(lambda f, i=i: queue.put_nowait((i, f)))
            futures.append(fut)
        try:
            for _ in jobs:
                while True:
                    i, item = await queue.get()
                    if isinstance(item, str):
                        yield i, item
                        continue
                    yield i, item.result()  # raises the job's error
                    break
        finally:
            cancelled.set()
            for fut in futures:
                if not fut.done():
                    fut.add_done_callback(_quiet)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _quiet(fut: asyncio.Future) -> None:
    # A job cancelled because its client left ends with Cancelled (or its step's error): expected.
    if not fut.cancelled() and fut.exception() is not None:
        logger.debug("job ended after its client left: %r", fut.exception())
