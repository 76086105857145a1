"""Real-process churn harness: a bootstrap and N peers on 127.0.0.1, killed and restarted on a
schedule while `swarm-train` trains; measures throughput, retries and lost microbatches.

Used by its CLI (simulations/churn_real.py), the simulator's calibration (simulations/calibrate.py)
and tests/simulations/test_churn_real.py. Every process it starts is killed by group and by pid;
a temp workdir is removed when the run ends.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simulations.progress import Progress
from simulations.scratch import scratch_dir
from swarm.procs import alive, family, kill_tree, start_ticks, stop_tree
from swarm.tiny_checkpoint import TINY_CONFIG as TINY_BASE
from swarm.tiny_checkpoint import write_tiny_checkpoint

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
STEP_RE = re.compile(r"^step (\d+) loss (\S+) samples/s (\S+) retries (\d+)")
# The trainer's own INFO line: how a step's time splits into microbatches and the stages' step.
SPLIT_RE = re.compile(r"step (\d+): compute ([\d.]+)s, waiting for stages ([\d.]+)s")
# The real swarm-train CLI, with its trainer module's INFO lines (the step split) in its log.
TRAINER_MAIN = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.WARNING, "
    "format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
    "logging.getLogger('swarm.training.trainer').setLevel(logging.INFO); "
    "from swarm.cli.train import main; sys.exit(main(sys.argv[1:]))"
)
SERVING = "serving blocks"
# The shared tiny Llama, with a vocabulary of bytes: it has no tokenizer, the trainer uses UTF-8.
TINY_CONFIG = {**TINY_BASE, "vocab_size": 256}


@dataclass
class HarnessConfig:
    """One harness run: the swarm's shape, the kill schedule and the training job."""

    mode: str = "train"
    peers: int = 4
    stages: int = 2
    kill_every: float = 15.0  # seconds between kills; 0: no churn
    kill_signal: str = "mixed"  # KILL, TERM or mixed (alternating, KILL first)
    restart_after: float = 3.0  # seconds from a kill to the replacement's start
    max_kills: int = 0  # stop killing after this many; 0: no limit
    steps: int = 12
    duration: float | None = None  # seconds of training (then stopped); None: run `steps`
    model: str = "tiny"
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 32
    microbatches: int = 4
    announce_period: float = 5.0  # a SIGKILLed peer's record lingers two periods
    max_wall: float = 300.0  # hard bound on the trainer's run, seconds
    workdir: str | None = None  # None: a temp dir, removed when the run ends

    def validate(self) -> None:
        if self.mode not in ("train", "generate"):
            raise ValueError(f"--mode must be train or generate, got {self.mode!r}")
        if self.mode == "generate":
            raise ValueError(
                "--mode generate needs the distributed swarm-generate client, "
                "which is not available yet (petals_like.cli raises); use --mode train"
            )
        if self.stages < 1 or self.peers < self.stages:
            raise ValueError(f"need at least one peer per stage: {self.peers} < {self.stages}")
        if self.kill_signal not in ("KILL", "TERM", "mixed"):
            raise ValueError("--kill-signal must be KILL, TERM or mixed")
        if self.kill_every < 0 or self.restart_after < 0:
            raise ValueError("--kill-every and --restart-after must be >= 0")


@dataclass
class HarnessResult:
    """What one run measured; `throughput` is samples/s between the first and last step line."""

    throughput: float
    throughput_wall: float  # samples / (trainer start to end), start-up included
    steps: int
    samples: int
    span_s: float  # seconds from the first to the last step line
    kills: int
    restarts: int
    retries: int
    resent: int
    lost: int
    finished: bool  # the trainer printed its summary (or ran until --duration stopped it)
    trainer_rc: int | None  # the trainer's exit status (None: still running when stopped)
    error: str  # the trainer's last "swarm-train:" error line, if any
    compute_s: float  # mean seconds per step spent on the microbatches
    wait_s: float  # mean seconds per step spent waiting for the stages to step together
    startup_s: float  # mean seconds from a peer's process start to serving (restarts only if any)
    kill_times: list[float] = field(default_factory=list)  # seconds after the first step
    # Steps during which every peer served (no kill, no replacement loading): the run's own
    # no-churn baseline, measured under the same machine load as the rest of the run.
    full_steps: int = 0
    full_throughput: float = 0.0
    full_wait_s: float = 0.0
    left_running: list[int] = field(default_factory=list)  # pids still alive after cleanup
    # [pid, start time in clock ticks] of every process started or seen as a descendant
    pids: list[list[int]] = field(default_factory=list)
    workdir: str = ""  # where the logs are; "" when they were in a temp dir, now removed


# Processes


class Proc:
    """A subprocess in its own session; stdout lines are kept with their arrival times."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None) -> None:
        self.argv = argv
        self.log_path = log
        self._log = open(log, "wb")
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group: the DHT fork and p2pd included
        )
        self.pid = self.proc.pid
        self.seen: dict[int, int] = {self.pid: start_ticks(self.pid)}  # pid -> start ticks
        self.done = False
        self.got_line = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path.with_suffix(".out"), "w") as out:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.lines.append((time.monotonic(), line))
                self.got_line.set()
                out.write(line + "\n")
                out.flush()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def snapshot(self) -> None:
        """Remember the current descendants, to reap them by pid if they outlive the parent."""
        if self.running():
            self.seen.update(family(self.pid))

    def signal(self, sig: int) -> None:
        self.snapshot()
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the process group and every descendant ever seen; wait for the parent.

        Once only: a pid seen earlier is killed only while it is still the same process.
        """
        if not self.done:
            self.snapshot()
            self._finish(kill_tree(self.proc, self.seen))

    def stop(self, sig: int, grace: float) -> None:
        """Send `sig` (SIGTERM drains), wait up to `grace` s, then kill what is left."""
        if not self.done:
            self.snapshot()
            self._finish(stop_tree(self.proc, sig, grace, self.seen))

    def _finish(self, left: list[int]) -> None:
        if left:
            logger.warning("still running after SIGKILL: %s", left)
        self.done = True
        if not self._log.closed:
            self._log.close()


# The swarm


def write_text(path: Path, seed: int = 0) -> Path:
    """A small training text of random words."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over the lazy dog while peers train a model".split()
    lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(400))
    path.write_text("\n".join(lines))
    return path


def num_layers(model: str) -> int:
    from swarm.model.loading import load_config, resolve_model

    return load_config(resolve_model(model)).num_layers


def spans(layers: int, stages: int) -> list[str]:
    """Half-open spans covering `layers` blocks in `stages` near-equal parts."""
    cuts = [round(i * layers / stages) for i in range(stages + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:], strict=False)]


class Swarm:
    """A bootstrap DHT process and the peers, each slot (a stage replica) restartable."""

    def __init__(self, cfg: HarnessConfig, model: str, workdir: Path, run_id: str) -> None:
        self.cfg, self.model, self.workdir, self.run_id = cfg, model, workdir, run_id
        self.env = {"SWARM_MESH_CACHE": str(workdir / "cache")}
        self.all: list[Proc] = []
        self.bootstrap: Proc | None = None
        self.maddr = ""
        stage_spans = spans(num_layers(model), cfg.stages)
        # Slot i serves stage i % S: replicas spread as evenly as N allows.
        self.slot_span = [stage_spans[i % cfg.stages] for i in range(cfg.peers)]
        self.slots: list[Proc | None] = [None] * cfg.peers
        self.startups: list[float] = []  # process start to serving, per (re)start

    def start(self, timeout: float = 180.0) -> None:
        argv = [sys.executable, "-m", "simulations.demo_swarm", "bootstrap"]
        self.bootstrap = self.spawn(argv, "bootstrap")
        deadline = time.monotonic() + timeout
        while not self.bootstrap.lines:
            if not self.bootstrap.running() or time.monotonic() > deadline:
                raise RuntimeError(f"bootstrap printed no multiaddr:\n{self.bootstrap.log_text()}")
            self.bootstrap.got_line.wait(0.5)
        self.maddr = self.bootstrap.lines[0][1]
        self.bootstrap.snapshot()
        for i in range(self.cfg.peers):
            self.start_slot(i)
        self.wait_serving(range(self.cfg.peers), deadline)

    def spawn(self, argv: list[str], name: str) -> Proc:
        proc = Proc(argv, self.workdir / f"{name}-{len(self.all)}.log", self.env)
        self.all.append(proc)
        return proc

    def start_slot(self, i: int) -> Proc:
        argv = [sys.executable, "-m", "swarm.cli.peer", "join", "--stage", self.slot_span[i]]
        argv += ["--model", self.model, "--initial-peers", self.maddr]
        argv += ["--announce-period", str(self.cfg.announce_period), "--max-start-delay", "0"]
        argv += ["--seed", str(self.cfg.seed * 1000 + len(self.all))]
        if self.cfg.mode == "train":
            argv += ["--train", "--run-id", self.run_id, "--quant", "none"]
        proc = self.spawn(argv, f"peer{i}")
        self.slots[i] = proc
        return proc

    def serving(self, i: int) -> bool:
        proc = self.slots[i]
        return proc is not None and proc.running() and SERVING in proc.log_text()

    def wait_serving(self, slots, deadline: float) -> None:
        pending = list(slots)
        while pending:
            for i in list(pending):
                proc = self.slots[i]
                if self.serving(i):
                    assert proc is not None
                    proc.snapshot()
                    self.startups.append(time.monotonic() - proc.started)
                    pending.remove(i)
                elif proc is None or not proc.running():
                    tail = proc.log_text()[-2000:] if proc else ""
                    raise RuntimeError(f"peer slot {i} exited before serving:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"peer slots {pending} not serving in time")
            time.sleep(0.3)

    def victims(self) -> list[int]:
        """Slots that may be killed: serving, and not the last serving replica of their stage."""
        out = []
        for i in range(self.cfg.peers):
            others = [
                j
                for j in range(self.cfg.peers)
                if j != i and self.slot_span[j] == self.slot_span[i] and self.serving(j)
            ]
            if self.serving(i) and others:
                out.append(i)
        return out

    def stop(self) -> None:
        for proc in reversed(self.all):
            proc.kill()

    def pids(self) -> list[tuple[int, int]]:
        return sorted({(p, t) for proc in self.all for p, t in proc.seen.items()})


# One run


def _signal_for(cfg: HarnessConfig, kill_index: int) -> int:
    if cfg.kill_signal == "KILL" or (cfg.kill_signal == "mixed" and kill_index % 2 == 0):
        return signal.SIGKILL
    return signal.SIGTERM


def _trainer_argv(cfg: HarnessConfig, swarm: Swarm, text: Path) -> list[str]:
    steps = cfg.steps if cfg.duration is None else 1_000_000
    argv = [sys.executable, "-c", TRAINER_MAIN, "--model", swarm.model]
    argv += ["--initial-peers", swarm.maddr, "--data", str(text), "--steps", str(steps)]
    argv += ["--batch-size", str(cfg.batch_size), "--seq-len", str(cfg.seq_len)]
    argv += ["--microbatches", str(cfg.microbatches), "--run-id", swarm.run_id]
    argv += ["--seed", str(cfg.seed), "--step-timeout", "60", "--max-attempts", "8"]
    return argv


def run_harness(cfg: HarnessConfig, progress: Progress | None = None) -> HarnessResult:
    """Start the swarm, train under the kill schedule, stop everything; the measured figures.

    progress: where to report what runs (the step, kills, restarts); None: silent.
    """
    cfg.validate()
    with scratch_dir("churn_real_", cfg.workdir) as workdir:
        result = _run(cfg, workdir, progress)
    if cfg.workdir is None:
        result.workdir = ""
    return result


def _run(cfg: HarnessConfig, workdir: Path, progress: Progress | None) -> HarnessResult:
    (workdir / "cache").mkdir(exist_ok=True)
    model = cfg.model
    if model == "tiny":
        model = str(write_tiny_checkpoint(workdir / "tiny-llama", TINY_CONFIG, std=None))
    text = write_text(workdir / "text.txt", cfg.seed)
    run_id = f"churn{cfg.seed}{os.getpid()}"
    swarm = Swarm(cfg, model, workdir, run_id)
    rng = random.Random(cfg.seed)
    kills, restarts, kill_times = 0, 0, []
    down: dict[int, list[float]] = {}  # slot -> [killed at, replacement serving at (or inf)]
    intervals: list[list[float]] = []
    pending: list[tuple[float, int]] = []  # (restart at, slot)
    trainer: Proc | None = None

    def say(status: str | Callable[[], str]) -> None:
        if progress is not None:
            progress.update(status)

    try:
        say(f"starting a bootstrap and {cfg.peers} peers, {cfg.stages} stage(s)")
        swarm.start()
        initial_startup = sum(swarm.startups) / len(swarm.startups)
        swarm.startups.clear()
        trainer = swarm.spawn(_trainer_argv(cfg, swarm, text), "trainer")
        t_start = time.monotonic()
        stopped = False  # we stopped a --duration run ourselves
        first_step: float | None = None
        counted = {p.pid for p in swarm.slots if p is not None}
        next_kill = float("inf")

        def status() -> str:
            done = sum(1 for _, x in trainer.lines if STEP_RE.match(x))
            goal = f"/{cfg.steps}" if cfg.duration is None else ""
            return f"training: step {done}{goal}, kills {kills}, restarts {restarts}"

        say(status)
        while trainer.running():
            now = time.monotonic()
            if now - t_start > cfg.max_wall:
                logger.warning("trainer still running after %.0f s: stopping it", cfg.max_wall)
                break
            if first_step is None and any(STEP_RE.match(x) for _, x in trainer.lines):
                first_step = now  # churn starts once training runs
                next_kill = now + cfg.kill_every if cfg.kill_every > 0 else float("inf")
            if cfg.duration is not None and first_step and now - first_step > cfg.duration:
                trainer.signal(signal.SIGINT)
                stopped = True
                try:
                    trainer.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                break
            if cfg.max_kills and kills >= cfg.max_kills:
                next_kill = float("inf")
            if now >= next_kill:
                choices = swarm.victims()
                if choices:
                    slot = rng.choice(choices)
                    victim = swarm.slots[slot]
                    assert victim is not None
                    sig = _signal_for(cfg, kills)
                    logger.info("kill %d: slot %d pid %d with %s", kills, slot, victim.pid, sig)
                    if sig == signal.SIGKILL:
                        victim.kill()  # a preempted machine: the whole group dies at once
                    else:
                        threading.Thread(target=victim.stop, args=(sig, 15.0), daemon=True).start()
                    swarm.slots[slot] = None
                    pending.append((now + cfg.restart_after, slot))
                    down[slot] = [now, float("inf")]
                    intervals.append(down[slot])
                    kills += 1
                    kill_times.append(now - (first_step or now))
                next_kill = now + cfg.kill_every
            for when, slot in list(pending):
                if now >= when:
                    pending.remove((when, slot))
                    swarm.start_slot(slot)
                    restarts += 1
            for proc in swarm.slots:
                if proc is not None and proc.pid not in counted and SERVING in proc.log_text():
                    counted.add(proc.pid)
                    proc.snapshot()  # its DHT fork and p2pd exist now: reap them by pid later
                    if proc.started > t_start:
                        swarm.startups.append(now - proc.started)
                        slot = swarm.slots.index(proc)
                        if slot in down:
                            down.pop(slot)[1] = now
            time.sleep(0.2)
        t_end = time.monotonic()
    finally:
        say("stopping the trainer and every peer")
        if trainer is not None and trainer.running():
            trainer.stop(signal.SIGINT, 20.0)
        swarm.stop()
    steps = [(t, m) for t, x in trainer.lines for m in [STEP_RE.match(x)] if m] if trainer else []
    summary = next((x for _, x in (trainer.lines if trainer else []) if "lost=" in x), "")
    fields = dict(kv.split("=", 1) for kv in summary.split() if "=" in kv)
    log = trainer.log_text() if trainer else ""
    span_s = steps[-1][0] - steps[0][0] if len(steps) > 1 else 0.0
    samples = int(fields.get("samples", len(steps) * cfg.batch_size))
    lost = int(fields["lost"]) if "lost" in fields else log.count("microbatch lost")
    lost += 0 if "lost" in fields else log.count("resend failed")
    errors = [x for x in log.splitlines() if x.startswith("swarm-train:")]
    splits = [(float(m.group(2)), float(m.group(3))) for m in SPLIT_RE.finditer(log)]
    # Steady state, as for throughput: the first step (wiring warm-up) is left out when possible.
    steady = splits[1:] if len(splits) > 1 else splits
    # Step i ran from step line i-1 to step line i; it is "full" if no peer was down meanwhile.
    full = [
        i
        for i in range(1, len(steps))
        if not any(a < steps[i][0] and b > steps[i - 1][0] for a, b in intervals)
    ]
    full_time = sum(steps[i][0] - steps[i - 1][0] for i in full)
    waits = {int(m.group(1)): float(m.group(3)) for m in SPLIT_RE.finditer(log)}
    full_waits = [
        waits[int(steps[i][1].group(1))] for i in full if int(steps[i][1].group(1)) in waits
    ]
    pids = swarm.pids()
    time.sleep(0.5)
    return HarnessResult(
        throughput=(len(steps) - 1) * cfg.batch_size / span_s if span_s > 0 else 0.0,
        throughput_wall=samples / (t_end - t_start) if t_end > t_start else 0.0,
        steps=len(steps),
        samples=samples,
        span_s=span_s,
        kills=kills,
        restarts=restarts,
        retries=int(fields.get("retries", sum(int(m.group(4)) for _, m in steps))),
        resent=int(fields.get("resent", 0)),
        lost=lost,
        finished=bool(summary) or stopped,
        trainer_rc=trainer.proc.returncode if trainer else None,
        error=errors[-1] if errors else "",
        compute_s=sum(c for c, _ in steady) / len(steady) if steady else 0.0,
        wait_s=sum(w for _, w in steady) / len(steady) if steady else 0.0,
        startup_s=sum(swarm.startups) / len(swarm.startups) if swarm.startups else initial_startup,
        kill_times=[round(k, 2) for k in kill_times],
        full_steps=len(full),
        full_throughput=len(full) * cfg.batch_size / full_time if full_time > 0 else 0.0,
        full_wait_s=sum(full_waits) / len(full_waits) if full_waits else 0.0,
        left_running=[p for p, t in pids if alive(p, t)],
        pids=[[p, t] for p, t in pids],
        workdir=str(workdir),
    )
