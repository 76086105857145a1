"""Calibration of the churn simulator against the real-process harness (churn_harness.py).

Used by `python -m simulations.churn_real --calibrate`: measures a run without and with churn,
fits the simulator's compute time to the first and checks its prediction of the second.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import statistics
import threading
import time
from pathlib import Path

from simulations.churn_harness import TINY_CONFIG, HarnessConfig, HarnessResult, run_harness
from simulations.progress import Progress
from simulations.sim.model import SimConfig
from simulations.sim.strategies import simulate

logger = logging.getLogger(__name__)

# A failed call to a SIGKILLed or draining peer is refused at once on loopback (no timeout).
DETECT_S = 1.0
SIM_SEEDS = 5  # the simulator's replica choice is random: average a few seeds
FIT_ROUNDS = 30
# Simulated horizon, in measured spans: long enough that whole steps do not quantise throughput.
HORIZON = 10
MIN_FULL_STEPS = 3
AVERAGED_RE = re.compile(
    r"stage (\d+:\d+) epoch (\d+): averaged \d+ samples with [2-9]\d* replicas in ([\d.]+)s"
)


def loopback_link(nbytes: int = 8 << 20, pings: int = 50) -> tuple[float, float]:
    """(one-way latency in ms, bandwidth in Mbit/s) of a TCP connection on 127.0.0.1."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            for _ in range(pings):
                conn.sendall(conn.recv(1))
            left = nbytes
            while left > 0:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                left -= len(chunk)
            conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.getsockname(), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                c.sendall(b"p")
                c.recv(1)
                rtts.append(time.perf_counter() - t0)
            payload = b"\0" * (1 << 16)
            t0 = time.perf_counter()
            for _ in range(nbytes // len(payload)):
                c.sendall(payload)
            c.recv(1)
            elapsed = time.perf_counter() - t0
    finally:
        thread.join(10)
        server.close()
    return statistics.median(rtts) / 2 * 1000.0, nbytes * 8 / elapsed / 1e6


def sim_base(cfg: HarnessConfig, model: str, latency_ms: float, bandwidth_mbps: float) -> dict:
    """SimConfig fields for the harness's swarm: shape, microbatches, timeouts and bans."""
    hf = TINY_CONFIG if model == "tiny" else json.loads((Path(model) / "config.json").read_text())
    return {
        "peers": cfg.peers,
        "stages": cfg.stages,
        "hidden": hf["hidden_size"],
        "layers": hf["num_hidden_layers"],
        "seq_len": cfg.seq_len,
        "vocab": 1,  # the LM head runs in the trainer, not on the last stage
        "bandwidth_mbps": bandwidth_mbps,
        "latency_ms": latency_ms,
        "speed_sigma": 0.0,  # identical peers on one machine
        "bytes_per_activation": 4.0,  # fp32 on the wire (the trainer's default codec)
        "microbatch": max(1, cfg.batch_size // cfg.microbatches),
        "in_flight_per_peer": cfg.microbatches / cfg.peers,
        "peers_per_trainer": cfg.peers,  # one trainer
        "detect_s": DETECT_S,
        "ban_s": 15.0,  # swarm-train's --ban-s
        "dht_refresh_s": 1.5 * cfg.announce_period,  # a dead record lingers up to 2 periods
        "retry_wait_s": 1.0,
        "max_retries": 8,  # swarm-train's --max-attempts
        "periodic_churn": True,
        "spare_last_replica": True,
        "step_barrier": True,
        "bins": 10,
    }


def predict(fields: dict, seeds: int = SIM_SEEDS) -> dict:
    """The simulator's mean throughput (samples/s) and lost samples over `seeds` seeds."""
    runs = [
        simulate(SimConfig(**{**fields, "seed": s, "strategy": "swarm-norebalance"}))
        for s in range(seeds)
    ]
    return {
        "throughput": statistics.fmean(r.throughput for r in runs),
        "lost_samples": sum(r.lost_samples for r in runs) / seeds,
        "preemptions": statistics.fmean(r.preemptions for r in runs),
        "retries": statistics.fmean(r.retries for r in runs),
    }


def fit_compute(base: dict, measured: float, hours: float) -> float:
    """compute_per_sample_s at which the simulator, without churn, matches `measured` samples/s.

    It absorbs what the simulator does not model per hop: two cores shared by all peers and the
    trainer, RPC and serialisation overheads. The step's wait is given (step_overhead_s).
    """
    fields = {**base, "hours": hours}

    def rate(c: float) -> float:
        return predict({**fields, "compute_per_sample_s": c}, seeds=2)["throughput"]

    # Bisection on log c: throughput falls as compute per sample grows.
    c0 = base["peers"] / base["stages"] / max(measured, 1e-9)  # the compute bound's inverse
    lo, hi = c0 * 1e-4, c0 * 10.0
    for _ in range(FIT_ROUNDS):
        mid = (lo * hi) ** 0.5
        if rate(mid) > measured:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def _figures(r: HarnessResult) -> dict:
    keep = ("throughput", "steps", "samples", "span_s", "kills", "restarts", "retries", "lost")
    data = {k: getattr(r, k) for k in keep}
    data |= {"finished": r.finished, "error": r.error}
    data |= {"compute_s": round(r.compute_s, 3), "wait_s": round(r.wait_s, 3)}
    data["startup_s"] = round(r.startup_s, 2)
    data["left_running"] = len(r.left_running)
    return data


def averaging_time(workdir: str | Path) -> float:
    """Mean seconds the replicas of a stage took to average, from the peers' logs (0 if none).

    Per (stage, epoch) the slowest replica counts: the trainer's step waits for it.
    """
    slowest: dict[tuple[str, str], float] = {}
    for log in Path(workdir).glob("peer*.log"):
        for stage, epoch, seconds in AVERAGED_RE.findall(log.read_text(errors="replace")):
            key = (stage, epoch)
            slowest[key] = max(slowest.get(key, 0.0), float(seconds))
    return statistics.fmean(slowest.values()) if slowest else 0.0


def calibrate(cfg: HarnessConfig, progress: Progress | None = None) -> dict:
    """Measure without churn, fit, measure with churn, predict it; the comparison as a dict.

    cfg.workdir is required: the fit reads the peers' logs of both runs (in no-churn/, churn/).
    """
    if cfg.workdir is None:
        raise ValueError("calibrate needs cfg.workdir: it reads the peers' logs after the runs")
    say = progress.update if progress is not None else logger.info
    say("measuring the loopback link")
    latency_ms, bandwidth_mbps = loopback_link()
    say("run 1 of 2: no churn")
    quiet_dir = str(Path(cfg.workdir) / "no-churn")
    quiet = run_harness(dataclasses.replace(cfg, kill_every=0.0, workdir=quiet_dir), progress)
    say(f"run 2 of 2: a kill every {cfg.kill_every:g} s")
    churn_dir = str(Path(cfg.workdir) / "churn")
    churn = run_harness(dataclasses.replace(cfg, workdir=churn_dir), progress)
    say("fitting the simulator to the runs")
    return compare(cfg, quiet, churn, latency_ms, bandwidth_mbps)


def compare(
    cfg: HarnessConfig,
    quiet: HarnessResult,
    churn: HarnessResult,
    latency_ms: float,
    bandwidth_mbps: float,
) -> dict:
    """Fit the simulator without churn, predict the churn run; the comparison as a dict.

    The machine is shared with other work whose load drifts between runs, so the prediction of
    the churn run is fitted to that run's own full-membership steps (every peer serving); the
    separate no-churn run is fitted and reported too, and its cross-run ratio shows the drift.
    """
    base = sim_base(cfg, cfg.model, latency_ms, bandwidth_mbps)
    quiet_fields = _fitted(base, quiet.wait_s, quiet.throughput, quiet.span_s, quiet.workdir)
    quiet_pred = predict({**quiet_fields, "hours": HORIZON * quiet.span_s / 3600.0})
    within = churn.full_steps >= MIN_FULL_STEPS and churn.full_throughput > 0
    if within:
        fitted = _fitted(
            base, churn.full_wait_s, churn.full_throughput, churn.span_s, churn.workdir
        )
    else:  # too few steps with every peer up: fall back on the no-churn run's fit
        fitted = quiet_fields
    churn_fields = {
        **fitted,
        "hours": HORIZON * churn.span_s / 3600.0,  # the periodic schedule, repeated
        "preempt_per_hour": 3600.0 / cfg.kill_every if cfg.kill_every > 0 else 0.0,
        "rejoin_delay_s": cfg.restart_after,
        # Measured process start to serving of the restarted peers (state download included).
        "startup_s": churn.startup_s,
        "state_bytes_per_param": 0.0,
    }
    full_pred = predict({**fitted, "hours": churn_fields["hours"]})
    churn_pred = predict(churn_fields)
    calibration_file = Path(churn.workdir) / "calibration.json"
    calibration_file.write_text(json.dumps(churn_fields, indent=1))
    ratio = churn_pred["throughput"] / churn.throughput if churn.throughput > 0 else float("nan")
    baseline = churn.full_throughput if within else quiet.throughput
    return {
        "link": {"latency_ms": round(latency_ms, 3), "bandwidth_mbps": round(bandwidth_mbps)},
        "calibration": {k: v for k, v in churn_fields.items() if k != "hours"},
        "baseline": "full-membership steps of the churn run" if within else "no-churn run",
        "no_churn": {
            "measured": _figures(quiet),
            "predicted": quiet_pred["throughput"],
            "ratio": quiet_pred["throughput"] / quiet.throughput if quiet.throughput else None,
        },
        "churn_full_steps": {
            "measured": churn.full_throughput,
            "steps": churn.full_steps,
            "predicted": full_pred["throughput"],
            "ratio": full_pred["throughput"] / baseline if baseline else None,
        },
        "churn": {
            "measured": _figures(churn),
            "predicted": churn_pred["throughput"],
            "predicted_lost_samples": churn_pred["lost_samples"],
            "predicted_preemptions_per_span": churn_pred["preemptions"] / HORIZON,
            "ratio": ratio,
            "within_20pct": abs(ratio - 1.0) <= 0.2,
            "valid": quiet.finished and churn.finished,
        },
        "churn_vs_baseline": {
            "measured": churn.throughput / baseline if baseline else None,
            "predicted": churn_pred["throughput"] / full_pred["throughput"]
            if full_pred["throughput"]
            else None,
        },
        "churn_vs_no_churn_run_measured": churn.throughput / quiet.throughput
        if quiet.throughput
        else None,
        "calibration_file": str(calibration_file),
        "workdirs": [quiet.workdir, churn.workdir],
    }


def _fitted(base: dict, wait_s: float, throughput: float, span_s: float, workdir: str) -> dict:
    """base with the step's wait split into averaging and the rest, and compute fitted."""
    averaging = min(averaging_time(workdir), wait_s)
    fields = {**base, "averaging_s": averaging, "step_overhead_s": wait_s - averaging}
    hours = HORIZON * span_s / 3600.0
    return {**fields, "compute_per_sample_s": fit_compute(fields, throughput, hours)}


def format_report(report: dict) -> str:
    q, f, c = report["no_churn"], report["churn_full_steps"], report["churn"]
    link, cal = report["link"], report["calibration"]
    lines = [
        f"loopback: {link['latency_ms']:.3f} ms one way, {link['bandwidth_mbps']} Mbit/s; "
        f"fitted on {report['baseline']}: compute_per_sample_s {cal['compute_per_sample_s']:.3f}, "
        f"step wait {cal['step_overhead_s']:.2f} s + averaging {cal['averaging_s']:.2f} s, "
        f"restart to serving {cal['startup_s']:.1f} s",
        f"{'samples/s':24} {'measured':>9} {'predicted':>9} {'pred/meas':>9} {'kills':>5} "
        f"{'lost':>4}",
        f"{'no-churn run (fitted)':24} {q['measured']['throughput']:>9.3f} {q['predicted']:>9.3f} "
        f"{q['ratio']:>9.3f} {0:>5} {q['measured']['lost']:>4}",
        f"{'churn run, all peers up':24} {f['measured']:>9.3f} {f['predicted']:>9.3f} "
        f"{f['ratio'] or 0:>9.3f} {'':>5} {'':>4}  ({f['steps']} steps)",
        f"{'churn run (predicted)':24} {c['measured']['throughput']:>9.3f} "
        f"{c['predicted']:>9.3f} {c['ratio']:>9.3f} {c['measured']['kills']:>5} "
        f"{c['measured']['lost']:>4}  ({'within' if c['within_20pct'] else 'NOT within'} 20%)",
        f"churn / all-peers-up: measured {report['churn_vs_baseline']['measured']:.3f}, "
        f"predicted {report['churn_vs_baseline']['predicted']:.3f}; churn run / no-churn run "
        f"measured {report['churn_vs_no_churn_run_measured']:.3f} (across runs: load drift)",
        f"calibration: {report['calibration_file']} (replay: python -m simulations.churn "
        f"--calibration {report['calibration_file']} --strategy swarm-norebalance --json)"
        if report["calibration_file"]
        else "calibration: not kept (its temp dir is removed; pass --workdir DIR to keep "
        "calibration.json and the logs)",
    ]
    if not c["valid"]:
        errors = " ".join(x["measured"]["error"] for x in (q, c))
        lines.insert(5, f"INVALID: a trainer did not finish: {errors}")
    return "\n".join(lines)
