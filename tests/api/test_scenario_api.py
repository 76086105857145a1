"""Scenarios with real processes: two peers, `swarm-api` in front, the official `openai` client and
headless Chromium. Tests petals_like/api/ and swarm/dashboard/ end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from swarm.generation import SamplingConfig, generate_local
from swarm.model.loading import load_model, load_tokenizer, resolve_model
from swarm.procs import family, kill_tree
from swarm.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint
from tests.conftest import REPO, PeerProcess, wait_for

openai = pytest.importorskip("openai")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "The swarm serves"


class ServerProcess:
    """A CLI that prints its URL (`swarm-api`, `swarm-peer status --web`), killed by pid."""

    def __init__(self, module: str, args: list[str], log: Path):
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.log = log
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self._family: dict[int, int] = {}

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if "http://" in line and not self.url:
                self.url = line.split("http://", 1)[1].split()[0].split("/")[0]
                self.url = "http://" + self.url
                self._ready.set()

    def wait_url(self, timeout: float = 90.0) -> str:
        if not self._ready.wait(timeout):
            self.kill()
            pytest.fail(f"no URL in {timeout} s:\n{self.log.read_text(errors='replace')[-3000:]}")
        self._family.update(family(self.proc.pid))
        return self.url

    def kill(self) -> None:
        kill_tree(self.proc, self._family)
        self._log.close()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The tiny random Llama with SmolLM2's tokenizer and chat template (real text in and out)."""
    folder = tmp_path_factory.mktemp("api") / "tinychat"
    config = {**TINY_CONFIG, "vocab_size": 49152, "max_position_embeddings": 512}
    write_tiny_checkpoint(folder, config)
    load_tokenizer(resolve_model("smollm2-135m")).save(folder)
    return folder


@pytest.fixture(scope="module")
def swarm(chat_model, tmp_path_factory, throughput_cache) -> Iterator[dict]:
    """Peers serving 0:3 and 3:6 (fp32, records every second) and `swarm-api` on a free port."""
    logs = tmp_path_factory.mktemp("api-logs")
    env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
    common = ["--model", str(chat_model), "--quant", "none", "--announce-period", "1"]
    started: list = []
    try:
        first = PeerProcess(["join", *common, "--stage", "0:3"], env, logs / "p0.log")
        started.append(first)
        maddrs = first.wait_maddrs(90)
        second = PeerProcess(
            ["join", *common, "--stage", "3:6", "--initial-peers", *maddrs], env, logs / "p1.log"
        )
        started.append(second)
        second.wait_maddrs(90)
        for p in started:
            p.wait_log("serving blocks", 90)
        api = ServerProcess(
            "petals_like.api.cli",
            ["--initial-peers", *maddrs, "--model", str(chat_model), "--port", "0"]
            + ["--compression", "none"],  # exact activations: text equal to local fp32
            logs / "api.log",
        )
        started.append(api)
        url = api.wait_url()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # Free cache of each peer while nothing runs: what every test must leave behind.
        idle = wait_for(lambda: len(cache_left(url)) == 2 and cache_left(url), 30, what="records")
        yield {
            "url": url,
            "client": client,
            "maddrs": maddrs,
            "model": chat_model.name,
            "idle": idle,
        }
    finally:
        for p in started:
            p.kill()


def local_greedy(model_dir: Path, prompt_ids: list[int], n: int) -> str:
    source = resolve_model(str(model_dir))
    tok = load_tokenizer(source)
    ids = generate_local(load_model(source), tok, prompt_ids, n, SamplingConfig())
    return tok.decode(ids)


def swarm_state(url: str) -> dict:
    return httpx.get(url + "/api/swarm", timeout=10).json()


def cache_left(url: str) -> dict[str, int]:
    return {p["peer_id"]: p["cache_tokens_left"] for p in swarm_state(url)["models"][0]["peers"]}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_completion_at_temperature_0_equals_swarm_generate_local(swarm, chat_model):
    c = swarm["client"]
    assert [m.id for m in c.models.list().data] == [swarm["model"]]
    out = subprocess.run(
        [sys.executable, "-m", "petals_like.cli", "--local", "--model", str(chat_model)]
        + ["--max-new-tokens", "16", PROMPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    r = c.completions.create(model=swarm["model"], prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == out.stdout.removesuffix("\n")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0
    # The alias the server was started with names the same model.
    again = c.completions.create(model=str(chat_model), prompt=PROMPT, max_tokens=16, temperature=0)
    assert again.choices[0].text == r.choices[0].text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stream_starts_before_the_end_and_stop_sequences_cut(swarm):
    c, url = swarm["client"], swarm["url"]
    full = c.completions.create(model=swarm["model"], prompt=PROMPT, max_tokens=200, temperature=0)
    stream = c.completions.create(
        model=swarm["model"],
        prompt=PROMPT,
        max_tokens=200,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, held = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.text and held is None:
                # The first piece is here: the generation still holds its session on the peers.
                held = swarm_state(url)["server"]["active_requests"]
            pieces.append(ch.text)
    assert held == 1, "the first chunk came only after the generation ended"
    assert "".join(pieces) == full.choices[0].text
    assert usage.completion_tokens == 200
    wait_for(lambda: cache_left(url) == swarm["idle"], 15, what="caches freed after the stream")

    # A stop sequence taken from the middle of the text ends it there, streamed or not.
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    cut = text[: text.index(stop)]
    r = c.completions.create(
        model=swarm["model"], prompt=PROMPT, max_tokens=200, temperature=0, stop=[stop]
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = c.completions.create(
        model=swarm["model"], prompt=PROMPT, max_tokens=200, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_four_concurrent_chats_are_each_correct(swarm, chat_model):
    c = swarm["client"]
    tok = load_tokenizer(resolve_model(str(chat_model)))
    questions = ["What is a swarm?", "Name a colour.", "Count to three.", "Say hello."]
    expected = {}
    for q in questions:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
        expected[q] = local_greedy(chat_model, ids, 24)
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask(q: str) -> None:
        try:
            r = c.chat.completions.create(
                model=swarm["model"],
                messages=[{"role": "user", "content": q}],
                max_tokens=24,
                temperature=0,
            )
            results[q] = r.choices[0].message.content
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == expected


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_client_that_disconnects_frees_its_sessions(swarm):
    url = swarm["url"]
    tokens_before = swarm_state(url)["server"]["tokens_generated"]
    body = {"model": swarm["model"], "prompt": PROMPT, "max_tokens": 480, "temperature": 0}
    seen = 0
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    wait_for(
        lambda: swarm_state(url)["server"]["active_requests"] == 0, 15, what="generation stopped"
    )
    generated = swarm_state(url)["server"]["tokens_generated"] - tokens_before
    assert generated < 240, f"{generated} of 480 tokens were generated after the client left"
    wait_for(lambda: cache_left(url) == swarm["idle"], 15, what="caches freed after a disconnect")

    # A non-streaming request whose client gives up is stopped too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    wait_for(
        lambda: swarm_state(url)["server"]["active_requests"] == 0, 15, what="generation stopped"
    )
    assert swarm_state(url)["server"]["tokens_generated"] - tokens_before < 480


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_requests_get_openai_errors_and_the_server_serves_on(swarm):
    url, c = swarm["url"], swarm["client"]
    cases = [
        ({"model": swarm["model"]}, 400, "prompt"),
        ({"model": swarm["model"], "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": swarm["model"], "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": swarm["model"], "prompt": "x", "n": 1000}, 400, "n"),
        ({"model": swarm["model"], "prompt": "x", "max_tokens": 100000}, 400, None),
        ({"model": swarm["model"], "prompt": [10**9]}, 400, None),
        ({"model": swarm["model"], "prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        if param:
            assert err["param"] == param, r.text
    r = httpx.post(
        url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": swarm["model"], "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(
            model=swarm["model"], messages=[{"role": "user", "content": "x"}], frequency_penalty=1
        )
    r = c.completions.create(model=swarm["model"], prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def _page_shows(url: str, shot: Path) -> list[tuple[str, str]]:
    """Open `url` in headless Chromium; the (peer id, span) rows the page lists."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium: `make setup` installs Debian's chromium when run as root")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(url + "/")
            page.wait_for_selector("tr.peer", timeout=20_000)
            page.wait_for_function(
                "document.querySelectorAll('tr.peer').length >= 2", timeout=20_000
            )
            rows = page.eval_on_selector_all(
                "tr.peer", "rows => rows.map(r => [r.dataset.peerId, r.dataset.span])"
            )
            counts = page.eval_on_selector_all(
                "[data-role=coverage] .block", "bs => bs.map(b => Number(b.dataset.count))"
            )
            assert counts == [1] * 6
            assert "every block served" in page.inner_text("section.model .summary")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return sorted((a, b) for a, b in rows)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dashboard_lists_every_live_peer_and_its_span(swarm, tmp_path):
    state = swarm_state(swarm["url"])
    peers = sorted((p["peer_id"], f"{p['start']}:{p['end']}") for p in state["models"][0]["peers"])
    assert sorted(span for _, span in peers) == ["0:3", "3:6"]
    assert all(p["reachability"] == "direct" for p in state["models"][0]["peers"])
    assert _page_shows(swarm["url"], tmp_path / "api-dashboard.png") == peers
    assert (tmp_path / "api-dashboard.png").stat().st_size > 10_000

    # `swarm-peer status --web` serves the same page alone.
    web = ServerProcess(
        "swarm.cli.peer",
        ["status", "--initial-peers", *swarm["maddrs"], "--web", "--port", "0"],
        tmp_path / "web.log",
    )
    try:
        url = web.wait_url()
        assert _page_shows(url, tmp_path / "status-web.png") == peers
        # Its round trips are measured from its own process (every PING_PERIOD).
        wait_for(
            lambda: all(p["rtt_ms"] for p in swarm_state(url)["models"][0]["peers"]),
            20,
            what="round trips on the page's data",
        )
        web.proc.send_signal(signal.SIGTERM)  # a graceful stop, exit code 0
        assert web.proc.wait(20) == 0
    finally:
        web.kill()
    print(json.dumps({"screenshots": [str(tmp_path / "api-dashboard.png")]}))
