"""PeerConfig: every setting of a serving peer, with the one set of defaults.

Used by the peer (`swarm.peer.server`, its announcer) and the `swarm-peer join` CLI; placement
(`swarm.peer.balancer`, `swarm.training.rebalance`) and the churn simulator take defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import swarm
from swarm.quant import DEFAULT_PEER_QUANT, QUANT_MODES


@dataclass
class PeerConfig:
    """Settings of one peer. Each field is the CLI flag `--field-name`, with its metadata's help."""

    model: str = field(
        default="smollm2-135m",
        metadata={
            "help": "model name (e.g. smollm2-135m) or path to a checkpoint folder / GGUF file"
        },
    )
    stage: str = field(
        default="auto",
        metadata={
            "help": "'auto' (serve where the swarm is weakest) or START:END, a half-open range "
            "of blocks"
        },
    )
    initial_peers: list[str] = field(
        default_factory=list,
        metadata={"help": "multiaddrs of peers to join; none starts a new swarm"},
    )
    quant: str = field(
        default=DEFAULT_PEER_QUANT,
        metadata={
            "help": "weight quantization of the served blocks: int8 (about 1 byte per "
            "parameter), nf4/fp4/int4 (about 0.52), none (the checkpoint's floats; --train "
            "needs none)",
            "choices": QUANT_MODES,
        },
    )
    num_blocks: int | None = field(
        default=None,
        metadata={
            "help": "how many blocks to serve with --stage auto (default: what memory allows)"
        },
    )
    torch_threads: int = field(
        default=0,
        metadata={
            "help": "compute threads (0: torch's default, one per core); peers sharing one "
            "machine should split its cores between them (oversubscribed threads spin)"
        },
    )
    pin_threads: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "off"),
            "help": "auto: a serving peer pins its compute threads one per CPU when they use "
            "every CPU it may run on (not with --train); off: the OS places them",
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=0, metadata={"help": "TCP port to listen on (0: any)"})
    direct_port: int = field(
        default=0,
        metadata={
            "help": "TCP port of the direct channel, which serves the streams without the p2pd "
            "daemons (0: any free port; -1: none). Announced only when the peer is reachable "
            "(not behind NAT); clients that cannot reach it use libp2p"
        },
    )
    announce_maddrs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "public multiaddrs to advertise instead of the listening ones (a "
            "port-forwarded peer behind NAT: the reachability check dials these)"
        },
    )
    reachability: str = field(
        default="auto",
        metadata={
            "help": "'auto': ask peers of the swarm to dial us back and serve through circuit "
            "relays if they cannot; 'direct': skip the check; 'relayed': always use relays",
            "choices": ("auto", "direct", "relayed"),
        },
    )
    relay_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds a peer behind NAT waits for a relay to take its reservation"},
    )
    identity: str | None = field(
        default=None,
        metadata={
            "help": "private key file; created if missing; keeps the peer id across restarts"
        },
    )
    compression: str = field(
        default="none", metadata={"help": "codec of replies when the client asks for none"}
    )
    link_delay: float = field(
        default=0.0,
        metadata={
            "help": "WAN emulation: seconds added to every message this peer sends to the mesh "
            "(one way; user space, the network is untouched)"
        },
    )
    link_bandwidth: float = field(
        default=0.0,
        metadata={"help": "WAN emulation: this peer's uplink in Mbit/s (0: no cap)"},
    )
    cache_tokens: int = field(
        default=8192,
        metadata={
            "help": "attention-cache budget in tokens (batch * max_length summed over sessions)"
        },
    )
    max_request_tokens: int = field(
        default=8192, metadata={"help": "largest request in tokens (batch * sequence length)"}
    )
    request_memory_mb: float = field(
        default=512.0,
        metadata={
            "help": "MiB of streamed requests held at once, over all clients (never less than "
            "one largest request); past it requests are refused as busy"
        },
    )
    client_sessions: int = field(
        default=32,
        metadata={"help": "most inference sessions one client (peer id) holds open at once"},
    )
    client_cache_share: float = field(
        default=0.25,
        metadata={"help": "largest share of --cache-tokens one client's sessions may hold"},
    )
    client_requests: int = field(
        default=64,
        metadata={
            "help": "most forwards, backwards and steps of one client queued or running at once"
        },
    )
    announce_period: float = field(
        default=30.0,
        metadata={"help": "seconds between DHT announcements (records expire after two)"},
    )
    rebalance_period: float = field(
        default=120.0, metadata={"help": "mean seconds between rebalancing checks"}
    )
    balance_quality: float = field(
        default=0.75,
        metadata={"help": "move only if the swarm's min throughput rises past today's / this"},
    )
    min_gain: float = field(
        default=0.2,
        metadata={
            "help": "with --train: move to the bottleneck stage only if the stage left still "
            "has more throughput than the bottleneck had, by this share of what the move adds"
        },
    )
    max_start_delay: float = field(
        default=5.0, metadata={"help": "most seconds of random delay before choosing a span"}
    )
    session_timeout: float = field(
        default=300.0, metadata={"help": "seconds an idle inference session is kept"}
    )
    request_timeout: float = field(default=60.0, metadata={"help": "seconds a request may take"})
    shutdown_grace: float = field(
        default=5.0, metadata={"help": "seconds to finish in-flight work after SIGTERM"}
    )
    dht_timeout: float = field(
        default=10.0, metadata={"help": "seconds each DHT get/store may take"}
    )
    adapter_cache_mb: float = field(
        default=256.0,
        metadata={"help": "memory for clients' LoRA adapters and deep prompts, in MiB"},
    )
    max_adapters: int = field(
        default=32, metadata={"help": "most client adapters held at once (multi-LoRA serving)"}
    )
    max_adapter_rank: int = field(default=64, metadata={"help": "largest LoRA rank accepted"})
    max_pre_seq_len: int = field(
        default=256, metadata={"help": "longest deep prompt accepted, in positions"}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "compute dtype: float32, float16 or bfloat16",
            "choices": ("float32", "float16", "bfloat16"),
        },
    )
    throughput_cache: str | None = field(
        default=None,
        metadata={"help": "file caching measured throughput (default ~/.cache/swarm_mesh/...)"},
    )
    seed: int | None = field(
        default=None, metadata={"help": "random seed for start delay and rebalancing jitter"}
    )
    train: bool = field(
        default=False,
        metadata={
            "help": "serve the span for SWARM training (trainable fp32 weights, replicas average)"
        },
    )
    run_id: str = field(
        default="swarm",
        metadata={"help": "name of the training run (with --train; letters, digits, - and _)"},
    )
    optim_8bit: bool = field(
        default=False, metadata={"help": "with --train: keep optimizer moments in 8 bits"}
    )
    matchmaking_time: float = field(
        default=1.0,
        metadata={"help": "with --train: seconds an averaging round waits for the other replicas"},
    )
    max_lr: float = field(
        default=1.0,
        metadata={"help": "with --train: cap on the learning rate a trainer's record may set"},
    )
    run_trainers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "with --train: peer ids of the trainers whose records may set this run's "
            "batch and optimizer settings (what swarm-train prints); none: any trainer's "
            "signed record, within bounds"
        },
    )

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
        if self.quant not in QUANT_MODES:
            raise ValueError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")
        if not 0 < self.max_lr <= 1:  # NaN fails too
            raise ValueError(f"--max-lr must be in (0, 1], got {self.max_lr}")
        if self.pin_threads not in ("auto", "off"):
            raise ValueError(f"--pin-threads must be auto or off, got {self.pin_threads!r}")
        if not 0 <= self.torch_threads <= 1024:
            raise ValueError(f"--torch-threads must be in 0..1024, got {self.torch_threads}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError("--num-blocks must be positive")
        if not -1 <= self.direct_port < 65536:
            raise ValueError(
                f"--direct-port must be -1 (none), 0 (any) or a port, got {self.direct_port}"
            )
        if self.reachability not in ("auto", "direct", "relayed"):
            raise ValueError(
                f"--reachability must be auto, direct or relayed, got {self.reachability!r}"
            )
        names = ("announce_period", "rebalance_period", "session_timeout", "request_timeout")
        for name in (*names, "relay_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.cache_tokens < 0 or self.max_request_tokens <= 0:
            raise ValueError("--cache-tokens must be >= 0 and --max-request-tokens positive")
        if self.request_memory_mb <= 0 or self.client_sessions <= 0 or self.client_requests <= 0:
            raise ValueError(
                "--request-memory-mb, --client-sessions, --client-requests must be > 0"
            )
        if not 0.0 < self.client_cache_share <= 1.0:  # NaN fails too
            raise ValueError("--client-cache-share must be in (0, 1]")
        if self.adapter_cache_mb < 0 or self.max_adapters < 0 or self.max_adapter_rank < 0:
            raise ValueError("--adapter-cache-mb, --max-adapters, --max-adapter-rank must be >= 0")
        if not 0.0 < self.balance_quality <= 1.0:
            raise ValueError("--balance-quality must be in (0, 1]")
        if self.min_gain < 0:
            raise ValueError("--min-gain must be >= 0")
