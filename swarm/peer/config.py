"""PeerConfig: every setting of a serving peer, with the one set of defaults.

Used by the peer (`swarm.peer.server`, its announcer) and the `swarm-peer join` CLI; placement
(`swarm.peer.balancer`, `swarm.training.rebalance`) and the churn simulator take defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import swarm


@dataclass
class PeerConfig:
    """Settings of one peer. The CLI flag of each field is `--field-name` (help in `HELP`)."""

    model: str = "smollm2-135m"
    stage: str = "auto"  # "auto" or "START:END" (half-open)
    initial_peers: list[str] = field(default_factory=list)
    quant: str = "none"  # weight quantization: "none" or "int8"
    num_blocks: int | None = None  # span length for --stage auto; None: what memory allows
    host: str = "127.0.0.1"  # interface the P2P daemon listens on
    port: int = 0  # 0: any free port
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to advertise
    identity: str | None = None  # private key file: the same peer id across restarts
    compression: str = "none"  # default codec of replies when the request names none
    cache_tokens: int = 8192  # attention-cache budget: sum of batch * max_length over sessions
    max_request_tokens: int = 8192  # most tokens (batch * length) one request may carry
    announce_period: float = 30.0  # seconds between DHT refreshes; records expire after two
    rebalance_period: float = 120.0  # mean seconds between rebalancing checks (jittered)
    balance_quality: float = 0.75  # move only if min throughput rises past today's / this
    min_gain: float = 0.2  # with --train: least gain of a stage move, as a share of ours
    max_start_delay: float = 5.0  # random delay before choosing a span, so peers spread out
    session_timeout: float = 300.0  # an inference session idle this long is freed
    request_timeout: float = 60.0  # longest a unary or streamed request may take
    shutdown_grace: float = 5.0  # seconds to finish in-flight work after SIGTERM
    dht_timeout: float = 10.0  # bound on each DHT get/store
    dtype: str = "float32"  # compute dtype of the blocks
    throughput_cache: str | None = None  # file of measured throughputs; None: ~/.cache/...
    seed: int | None = None  # seeds the start delay and the rebalancing jitter (tests)
    train: bool = False  # SWARM training: fp32 trainable span, replicas average (swarm.training)
    run_id: str = "swarm"  # the training run this peer's stage belongs to (with --train)
    optim_8bit: bool = False  # with --train: AdamW moments in 8-bit block-wise dynamic codes
    matchmaking_time: float = 1.0  # with --train: seconds a round waits for the stage's replicas

    @property
    def version(self) -> str:
        return swarm.__version__

    def span(self) -> tuple[int, int] | None:
        """The fixed span from `stage`, or None for "auto"."""
        if self.stage == "auto":
            return None
        try:
            start, end = (int(x) for x in self.stage.split(":"))
        except ValueError:
            raise ValueError(f"--stage must be 'auto' or START:END, got {self.stage!r}") from None
        if not 0 <= start < end:
            raise ValueError(f"--stage {self.stage}: need 0 <= START < END")
        return start, end

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        self.span()
        if self.quant not in ("none", "int8"):
            raise ValueError(f"--quant must be 'none' or 'int8', got {self.quant!r}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError("--num-blocks must be positive")
        for name in ("announce_period", "rebalance_period", "session_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.cache_tokens < 0 or self.max_request_tokens <= 0:
            raise ValueError("--cache-tokens must be >= 0 and --max-request-tokens positive")
        if not 0.0 < self.balance_quality <= 1.0:
            raise ValueError("--balance-quality must be in (0, 1]")
        if self.min_gain < 0:
            raise ValueError("--min-gain must be >= 0")


HELP = {
    "model": "model name (e.g. smollm2-135m) or path to a checkpoint folder / GGUF file",
    "stage": "'auto' (serve where the swarm is weakest) or START:END, a half-open block range",
    "initial_peers": "multiaddrs of peers to join; none starts a new swarm",
    "quant": "weight quantization of the served blocks",
    "num_blocks": "how many blocks to serve with --stage auto (default: what memory allows)",
    "host": "interface to listen on",
    "port": "TCP port to listen on (0: any)",
    "announce_maddrs": "public multiaddrs to advertise instead of the listening ones",
    "identity": "private key file; created if missing; keeps the peer id across restarts",
    "compression": "codec of replies when the client asks for none",
    "cache_tokens": "attention-cache budget in tokens (batch * max_length summed over sessions)",
    "max_request_tokens": "largest request in tokens (batch * sequence length)",
    "announce_period": "seconds between DHT announcements (records expire after two)",
    "rebalance_period": "mean seconds between rebalancing checks",
    "balance_quality": "move only if the swarm's min throughput rises past today's / this",
    "min_gain": "with --train: move to the bottleneck stage only if the stage left still has more "
    "throughput than the bottleneck had, by this share of what the move adds there",
    "max_start_delay": "most seconds of random delay before choosing a span",
    "session_timeout": "seconds an idle inference session is kept",
    "request_timeout": "seconds a request may take",
    "shutdown_grace": "seconds to finish in-flight work after SIGTERM",
    "dht_timeout": "seconds each DHT get/store may take",
    "dtype": "compute dtype: float32, float16 or bfloat16",
    "throughput_cache": "file caching measured throughput (default ~/.cache/swarm_mesh/...)",
    "seed": "random seed for start delay and rebalancing jitter",
    "train": "serve the span for SWARM training (trainable fp32 weights, replicas average)",
    "run_id": "name of the training run (with --train; letters, digits, - and _)",
    "optim_8bit": "with --train: keep optimizer moments in 8 bits",
    "matchmaking_time": "with --train: seconds an averaging round waits for the other replicas",
}

assert set(HELP) == {f.name for f in fields(PeerConfig)}, "every PeerConfig field needs help"
