"""The dashboard's web side: the page at `/`, its data at `/api/swarm`, and a uvicorn runner.

Used by `swarm-peer status --web` (`serve_dashboard`) and by `swarm-api` (`dashboard_router`,
`run_server`). The page is one file with no external assets: it works with no internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from swarm.dashboard.snapshot import fetch_tables, snapshot
from swarm.dht import make_dht
from swarm.loops import within

logger = logging.getLogger(__name__)

PING_TIMEOUT = 2.0  # seconds a peer has to answer the dashboard's round-trip probe
PING_PERIOD = 5.0  # the dashboard re-measures round trips at most this often
CACHE_S = 1.0  # snapshots younger than this are served again (many open pages, one DHT read)


def page_html() -> str:
    return resources.files("swarm.dashboard").joinpath("page.html").read_text(encoding="utf-8")


def dashboard_router(source: Callable[[], Awaitable[dict]]) -> APIRouter:
    """Routes `/` (the page) and `/api/swarm` (its JSON, from `await source()`)."""
    router = APIRouter()
    html = page_html()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    @router.get("/api/swarm")
    async def swarm_state() -> JSONResponse:
        return JSONResponse(await source())

    return router


class CachedSnapshot:
    """`await source()` gives the latest snapshot, reading the DHT at most once per CACHE_S.

    read: blocking function () -> list of tables (runs in a thread); extra: () -> dict merged
    into the snapshot (what the serving process knows, e.g. its round trips).
    """

    def __init__(self, read: Callable[[], list[dict]], extra: Callable[[], dict] | None = None):
        self._read, self._extra = read, extra
        self._value: dict | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at > CACHE_S:
                try:
                    tables = await asyncio.to_thread(self._read)
                    error = None
                except Exception as e:  # the page shows the error and keeps polling
                    logger.warning("could not read the swarm: %s", e)
                    tables = self._value["models"] if self._value else []
                    error = str(e)
                extra = self._extra() if self._extra else {}
                self._value = snapshot(tables, error=error, **extra)
                self._at = time.monotonic()
            return self._value


class RoundTrips:
    """Round trips from this process to every peer in the last snapshot, re-measured every
    PING_PERIOD. Runs on the server's event loop (the P2P handle lives there)."""

    def __init__(self, dht: Any):
        self.dht = dht
        self.rtts: dict[str, float] = {}
        self._client: Any = None
        self._task: asyncio.Task | None = None
        self.peer_ids: set[str] = set()

    async def start(self) -> None:
        from swarm.peer.client import PeerClient

        self._client = PeerClient(await self.dht.replicate_p2p())
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _ping(self, peer_id: str) -> None:
        t0 = time.perf_counter()
        try:
            await within(self._client.info(peer_id, timeout=PING_TIMEOUT), PING_TIMEOUT)
        except Exception as e:  # shown as "no answer"
            logger.debug("ping %s: %r", peer_id, e)
            self.rtts.pop(peer_id, None)
            return
        self.rtts[peer_id] = time.perf_counter() - t0

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._ping(p) for p in list(self.peer_ids)))
            await asyncio.sleep(PING_PERIOD)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket on (host, port); port 0 takes a free one. Raises AddressInUse if taken."""
    from swarm.errors import AddressInUse

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise AddressInUse(
            f"cannot listen on {host}:{port} ({e.strerror}): pick another --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI, host: str, port: int, on_listening: Callable[[str], None]) -> None:
    """Serve `app` with uvicorn on uvloop; on_listening gets the base URL.

    SIGINT and SIGTERM stop it gracefully and return here (uvicorn would re-raise them and kill
    the process before its caller's clean-up: the DHT, the swarm sessions).
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                if self._captured_signals:
                    logger.info("signal %s: stopping", self._captured_signals[-1])
                self._captured_signals.clear()

    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, loop="uvloop", log_level="warning", timeout_graceful_shutdown=5)
    on_listening(f"http://{shown}:{bound}")
    Server(config).run(sockets=[sock])


def serve_dashboard(
    initial_peers: Sequence[str],
    model: str | None,
    host: str,
    port: int,
    timeout: float,
    on_listening: Callable[[str], None],
) -> int:
    """`swarm-peer status --web`: the page alone, reading the swarm through a client DHT."""

    dht = make_dht(initial_peers=list(initial_peers), client_mode=True, start=True)
    trips = RoundTrips(dht)

    def read() -> list[dict]:
        tables = fetch_tables(dht, model, timeout, trips.rtts)
        trips.peer_ids = {
            p["peer_id"] for t in tables for p in t["peers"] if p["state"] != "offline"
        }
        return tables

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await trips.start()
        yield
        await trips.stop()

    app = FastAPI(title="Swarm Mesh dashboard", lifespan=lifespan)
    app.include_router(dashboard_router(CachedSnapshot(read, lambda: {"source": "swarm-peer"})))
    try:
        run_server(app, host, port, on_listening)
    finally:
        dht.shutdown()
    return 0
