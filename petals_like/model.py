"""DistributedModelForCausalLM: embeddings and head kept locally, every block served by the swarm.

Used by `swarm-generate` (petals_like.distributed_cli, run by the swarm demo), benchmarks, users.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from petals_like.finetuning import FineTuningMixin
from petals_like.loop import BackgroundLoop
from petals_like.router import RouterConfig, SwarmRouter
from petals_like.routing import Hop, RouteCosts
from petals_like.session import Failover, RemoteInferenceSession
from petals_like.tuning import RemoteTuning, TuningConfig
from petals_like.verify import DEFAULT_FRACTION, Liar, RolledBack, Verifier
from swarm.dht import make_dht
from swarm.errors import BadRequest, CheckpointError, PeerUnavailable
from swarm.generation import SamplingConfig, eos_ids, generation_loop, new_token_budget
from swarm.link import Link
from swarm.model.config import ModelConfig
from swarm.model.llama import ClientParts

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # bound on joining the DHT and the first read of the swarm
MAX_ROLLBACKS = 8  # liars found in one generate() before it gives up


class InferenceSession:
    """A session whose caches stay on the swarm across `generate` calls (a chat).

    Use as `with model.inference_session(max_length=...) as s:`; `generate` calls inside the
    block continue the same session. `step` runs hidden states through every remote block.
    """

    def __init__(self, model: DistributedModelForCausalLM, max_length: int, batch_size: int):
        self.model = model
        self.max_length, self.batch_size = max_length, batch_size
        # Soft prompts take the first positions of the swarm's caches.
        self._pre = model.tuning.pre_seq_len if model.tuning is not None else 0
        adapter = model.adapter_payload if model.tuning is not None else None
        verifier = Verifier(model.verify) if model.verify else None
        self._remote = RemoteInferenceSession(
            model.router, max_length + self._pre, batch_size, adapter=adapter, verifier=verifier
        )
        # Token bookkeeping for generate(): ids seen so far (for the repetition penalty) and the
        # last sampled token, which has not been through the swarm yet.
        self.token_ids: torch.Tensor = torch.zeros(batch_size, 0, dtype=torch.long)
        self.pending: torch.Tensor | None = None
        self._closed = False

    @property
    def position(self) -> int:
        """Positions the swarm's caches hold (soft prompts not counted)."""
        return max(0, self._remote.position - self._pre)

    @property
    def route(self) -> list[Hop]:
        return self._remote.route

    @property
    def failovers(self) -> list[Failover]:
        return self._remote.failovers

    @property
    def verifier(self) -> Verifier | None:
        return self._remote.verifier

    @property
    def verified(self) -> int:
        """Positions [0, verified) whose outputs were checked on other replicas (or uncheckable)."""
        return max(0, self._remote.verified - self._pre)

    def verify_now(self, timeout: float | None = None) -> None:
        """Check every position so far; raises RolledBack (position in our positions) on a liar."""
        self._catch(self._remote.verify_now(), timeout)

    def _catch(self, coro: Any, timeout: float | None) -> Any:
        try:
            return self.model.loop.run(coro, timeout)
        except RolledBack as e:
            if self._remote.position < self._pre:  # a soft prompt's position: feed it again
                self.model.loop.run(self._remote.rollback(0), 10.0)
            e.position = self.position
            raise

    def step(self, hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """[B, T, H] hidden states at the next T positions through every block of the swarm.

        With verification on, raises petals_like.verify.RolledBack when a liar was found: the
        session went back to its `position` (generate() handles it and goes on from there).
        """
        first = self._pre and self._remote.position == 0
        if first:
            hidden = self.model.tuning.prepend(hidden)
        out = self._catch(self._remote.step(hidden), timeout)
        return out[:, self._pre :] if first else out

    def rollback(self, position: int, timeout: float | None = 10.0) -> None:
        """Keep only the first `position` positions on the swarm (speculative decoding)."""
        self.model.loop.run(self._remote.rollback(position + self._pre), timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.model.loop.run(self._remote.close(), timeout=10.0)

    def __enter__(self) -> InferenceSession:
        self.model._active_sessions.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in self.model._active_sessions:
            self.model._active_sessions.remove(self)
        self.close()


@dataclass
class GenerationStats:
    """What the last generate() did: for the CLI's summary and benchmarks."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    route: list[Hop] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # time.monotonic() per new token
    speculative: Any = None  # swarm.speculative.SpeculativeStats when drafts were verified
    liars: list[Liar] = field(default_factory=list)  # peers caught lying (petals_like.verify)
    verify_checks: int = 0  # hop steps re-run on another replica
    unverifiable: list[tuple[int, int]] = field(default_factory=list)  # spans with one replica
    regenerated: int = 0  # tokens dropped and generated again after a liar was found
    unsettled: list[str] = field(default_factory=list)  # disagreements no third replica settled

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s after the first token (the steady decoding rate)."""
        if self.new_tokens < 2:
            return 0.0
        return (self.new_tokens - 1) / max(1e-9, self.total_s - self.first_token_s)


class DistributedModelForCausalLM(FineTuningMixin):
    """A causal LM whose blocks run on the swarm; generate() samples locally.

    Make one with `from_pretrained`; close it (or use `with`) to leave the swarm.
    """

    def __init__(
        self,
        config: ModelConfig,
        client_parts: ClientParts,
        router: SwarmRouter,
        loop: BackgroundLoop,
        dht: Any = None,
        tokenizer: Any = None,
        model_prefix: str = "",
        verify: float = 0.0,
    ):
        self.config, self.client_parts = config, client_parts
        self.router, self.loop, self.dht = router, loop, dht
        self.tokenizer = tokenizer
        self.model_prefix = model_prefix
        self.last_stats = GenerationStats()
        self._active_sessions: list[InferenceSession] = []
        self._owns_dht = False
        self._closed = False
        self.tuning: RemoteTuning | None = None
        self._blocks = None
        self._payloads: dict[tuple, Any] = {}
        self.verify = verify

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers: Sequence[str],
        *,
        compression: str | None = None,
        link_delay: float = 0.0,
        link_bandwidth: float = 0.0,
        router_config: RouterConfig | None = None,
        costs: RouteCosts | None = None,
        dht: Any = None,
        load_tokenizer: bool = True,
        start_timeout: float = START_TIMEOUT,
        tuning: str | TuningConfig | None = None,
        adapter: str | None = None,
        verify: float = DEFAULT_FRACTION,
        **tuning_options: Any,
    ) -> DistributedModelForCausalLM:
        """Load the client parts of `model` and join the swarm at `initial_peers`.

        model: an alias (smollm2-135m), a Hugging Face folder or a .gguf file; its name is the
            DHT prefix the peers announce under.
        initial_peers: multiaddrs of any peers of the swarm.
        compression: activation codec: "auto" (per peer by its measured link: exact fp32 unless
            that costs over a tenth of the step, then bf16 unless over a quarter, then
            int8-block64; petals_like.codec_policy),
            "none" (exact: fp32 on the wire) or a codec name; by default router_config's.
        link_delay, link_bandwidth: WAN emulation (swarm.link): seconds added to every message
            this client sends to a peer (one way; peers add theirs with `--link-delay`), and
            this client's uplink in Mbit/s (0: no cap).
        router_config: routing, timeout, ban and compression settings.
        dht: an already running hivemind.DHT to share; by default one is started in client mode.
        tuning: fine-tune a frozen swarm: "lora", "ptune", "deep_ptune" or a TuningConfig;
            tuning_options are TuningConfig's fields (rank, alpha, dropout, targets, pre_seq_len,
            train_embeddings, train_head). Train `model.parameters()` through `model(ids)`.
        adapter: a folder saved by `save_adapter` (a PEFT LoRA folder, or soft prompts) to
            generate with; the peers get it once per session, and other clients do not see it.
        verify: fraction of steps whose every hop is re-run on another replica of its span and
            compared (petals_like.verify); a liar is banned and its tokens generated again. 0
            turns checking off; 1 checks every step.
        """
        from hivemind.p2p import P2PDaemonError

        from swarm.model import loading
        from swarm.net import check_initial_peers, daemon_error_message
        from swarm.peer import PeerClient

        if not initial_peers and dht is None:
            raise BadRequest("initial_peers is empty: give the multiaddr of a peer of the swarm")
        if tuning is not None and adapter is not None:
            raise BadRequest("give tuning= (train a new adapter) or adapter= (load one), not both")
        if not 0.0 <= verify <= 1.0:
            raise BadRequest(f"verify must be a fraction in [0, 1], got {verify}")
        if tuning_options and tuning is None:
            raise BadRequest(f"options {sorted(tuning_options)} need tuning=")
        rc = with_compression(router_config, compression)
        source = loading.resolve_model(model)
        config = loading.load_config(source)
        client_parts = loading.load_client_parts(source)
        tokenizer = None
        if load_tokenizer:
            try:
                tokenizer = loading.load_tokenizer(source)
            except (CheckpointError, OSError) as e:  # token ids still work without one
                logger.info("model %s has no usable tokenizer: %s", source.name, e)
        owns_dht = dht is None
        if owns_dht:
            # The DHT forks its own process: start it before our loop thread exists.
            check_initial_peers(initial_peers)
            try:
                dht = make_dht(initial_peers=list(initial_peers), client_mode=True, start=True)
            except P2PDaemonError as e:
                raise PeerUnavailable(daemon_error_message(e)) from e
        loop = BackgroundLoop()
        try:
            p2p = loop.run(dht.replicate_p2p(), timeout=start_timeout)
            router = SwarmRouter(
                dht,
                PeerClient(p2p, link=Link(link_delay, link_bandwidth), use_direct=rc.direct),
                source.name,
                config.num_layers,
                config=rc,
                costs=costs,
            )
            router.hidden_size = config.hidden_size  # "auto" codec probes (codec_policy)
            loop.run(router.start(), timeout=start_timeout)
        except BaseException:
            loop.close()
            if owns_dht:
                dht.shutdown()
            raise
        self = cls(config, client_parts, router, loop, dht, tokenizer, source.name, verify)
        self._owns_dht = owns_dht
        try:
            if tuning is not None:
                tc = tuning if isinstance(tuning, TuningConfig) else TuningConfig(tuning)
                self.set_tuning(
                    RemoteTuning(
                        config,
                        dataclasses.replace(tc, **tuning_options),
                        client_parts.embed_tokens.weight,
                    )
                )
            elif adapter is not None:
                from petals_like.peft_format import load_adapter

                self.set_tuning(load_adapter(adapter, config, client_parts))
        except BaseException:
            self.close()
            raise
        return self

    # ---- sessions and generation -----------------------------------------------------------------
    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """A session holding up to `max_length` positions on the swarm; use it with `with`."""
        if max_length > self.config.max_position_embeddings:
            raise BadRequest(
                f"max_length {max_length} exceeds the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        return InferenceSession(self, max_length, batch_size)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_on_eos: bool = True,
        session: InferenceSession | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        step_timeout: float | None = 600.0,
        on_prefill: Callable[[int, int], None] | None = None,
        speculative: Any = None,
        on_sampled: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Sample up to `max_new_tokens` after `input_ids` [B, T]; returns [B, T + new].

        Inside `with model.inference_session(...)` (or with `session=`), the call continues the
        session: `input_ids` are only the new tokens (e.g. the next user turn of a chat).
        temperature 0 is greedy; top_k, top_p and repetition_penalty as in swarm.generation;
        seed makes sampling reproducible. on_token gets each new [B] tensor of token ids once
        it is final: with verification on, once the outputs it came from were checked (or no
        second replica could check them), so it may come a few tokens after it was sampled.
        on_sampled gets each token as soon as it is sampled (timing, progress, acting at token
        k); after a rollback over a liar, tokens it saw may be sampled again (differently).
        step_timeout bounds each step, failovers included. Near the end of the context, generation
        cuts `max_new_tokens` down to what fits. on_prefill gets (tokens done, tokens in
        all) while a long prompt is prefilled in steps of `swarm.generation.PREFILL_CHUNK`.
        speculative: "ngram" (prompt lookup), a local draft model's path or alias (same
        tokenizer), or a swarm.speculative drafter: each chain round trip verifies a draft of
        several tokens (batch 1). Greedy text is unchanged; sampled text keeps the model's
        distribution. last_stats.speculative tells tokens per round trip.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise BadRequest(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
        if max_new_tokens < 0:
            raise BadRequest(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise BadRequest(f"token ids must be in 0..{self.config.vocab_size - 1}")
        sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
        if session is None and self._active_sessions:
            session = self._active_sessions[-1]
        own = session is None
        if own:
            max_new_tokens = new_token_budget(
                ids.shape[1], max_new_tokens, self.config.max_position_embeddings
            )
            session = self.inference_session(ids.shape[1] + max_new_tokens, ids.shape[0])
        elif ids.shape[0] != session.batch_size:
            raise BadRequest(
                f"batch {ids.shape[0]} differs from the session's {session.batch_size}"
            )
        try:
            new = self._generate(
                session,
                ids,
                max_new_tokens,
                sampling,
                stop_on_eos,
                on_token,
                step_timeout,
                on_prefill,
                speculative,
                on_sampled,
            )
        finally:
            if own:
                session.close()
        return torch.cat([ids, new], dim=1)

    def _generate(
        self,
        session: InferenceSession,
        ids: torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingConfig,
        stop_on_eos: bool,
        on_token: Callable[[torch.Tensor], None] | None,
        step_timeout: float | None,
        on_prefill: Callable[[int, int], None] | None = None,
        speculative: Any = None,
        on_sampled: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        feed = ids if session.pending is None else torch.cat([session.pending[:, None], ids], 1)
        room = session.max_length - session.position - feed.shape[1] + 1
        if max_new_tokens > room:
            raise BadRequest(
                f"the session has room for {max(0, room)} more new tokens, {max_new_tokens} asked"
            )
        stats = GenerationStats(prompt_tokens=ids.shape[1])
        t0 = time.monotonic()
        failovers_before = len(session.failovers)
        verifier = session.verifier
        liars_before = len(verifier.liars) if verifier is not None else 0
        checks_before = verifier.checks if verifier is not None else 0
        unsettled_before = len(verifier.unsettled) if verifier is not None else 0
        # Ids seen so far, for the repetition penalty; kept by the session for the next call.
        session.token_ids = torch.cat([session.token_ids, ids], dim=1)
        base = session.token_ids.shape[1]  # new token k lands at token_ids[:, base + k]
        held: list[torch.Tensor] = []  # new tokens; with verification, passed on once checked
        emitted = [0]

        def release(everything: bool = False) -> None:
            # New token k comes from the output at position base + k - 1.
            while emitted[0] < len(held) and (
                everything or verifier is None or session.verified >= base + emitted[0]
            ):
                if on_token is not None:
                    on_token(held[emitted[0]])
                emitted[0] += 1

        def step(step_input: torch.Tensor) -> torch.Tensor:
            hidden = session.step(self.client_parts.embed(step_input), timeout=step_timeout)
            # Logits of every position, then the last: the same ops as generate_local.
            return self.client_parts.logits(hidden)[:, -1]

        def step_all(step_input: torch.Tensor) -> torch.Tensor:
            hidden = session.step(self.client_parts.embed(step_input), step_timeout)
            return self.client_parts.logits(hidden)[0]

        def on_new(nxt: torch.Tensor) -> None:
            session.token_ids = torch.cat([session.token_ids, nxt[:, None]], dim=1)
            session.pending = nxt
            stats.token_times.append(time.monotonic())
            if len(stats.token_times) == 1:
                stats.first_token_s = stats.token_times[0] - t0
            held.append(nxt)
            if on_sampled is not None:
                on_sampled(nxt)
            release()

        eos = eos_ids(self.tokenizer, self.config)
        left = max_new_tokens
        try:
            for _ in range(MAX_ROLLBACKS + 1):
                try:
                    self._loop_once(
                        session, feed, left, sampling, stop_on_eos, on_new, on_prefill, eos,
                        speculative, step, step_all, stats,
                    )  # fmt: skip
                    if verifier is not None:
                        session.verify_now(step_timeout)
                    break
                except RolledBack as rb:
                    # Tokens sampled from position rb.position on came from a liar's outputs.
                    p = rb.position
                    good = session.token_ids[:, : max(p + 1, base)]
                    kept = good.shape[1] - base
                    if kept < emitted[0]:
                        logger.warning(
                            "verification: %d tokens already passed on came from a liar's "
                            "outputs (a colluding checker?)",
                            emitted[0] - kept,
                        )
                    stats.regenerated += len(held) - kept
                    del held[kept:], stats.token_times[kept:]
                    session.token_ids, session.pending = good, None
                    feed, left = good[:, p:], max_new_tokens - kept
            else:
                raise PeerUnavailable(f"gave up after {MAX_ROLLBACKS} rollbacks over liars")
            release(everything=True)  # no replica could check what is left
            new = session.token_ids[:, base:]
            return new if new.shape[1] else torch.zeros(ids.shape[0], 0, dtype=torch.long)
        finally:
            stats.new_tokens = len(stats.token_times)
            stats.total_s = time.monotonic() - t0
            stats.route = list(session.route)
            stats.failovers = list(session.failovers[failovers_before:])
            if verifier is not None:
                stats.liars = list(verifier.liars[liars_before:])
                stats.verify_checks = verifier.checks - checks_before
                stats.unverifiable = sorted(verifier.unverifiable)
                stats.unsettled = list(verifier.unsettled[unsettled_before:])
            self.last_stats = stats

    def _loop_once(
        self,
        session: InferenceSession,
        feed: torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingConfig,
        stop_on_eos: bool,
        on_new: Callable[[torch.Tensor], None],
        on_prefill: Callable[[int, int], None] | None,
        eos: Any,
        speculative: Any,
        step: Callable[[torch.Tensor], torch.Tensor],
        step_all: Callable[[torch.Tensor], torch.Tensor],
        stats: GenerationStats,
    ) -> None:
        """One run of the sampling loop from `feed` (again after a rollback over a liar)."""
        if speculative is not None:
            from swarm.speculative import SpeculativeStats, make_drafter, speculative_loop

            if stats.speculative is None:
                stats.speculative = SpeculativeStats()
            speculative_loop(
                step_all,
                session.rollback,
                session.position,
                feed,
                session.token_ids,
                max_new_tokens,
                sampling,
                make_drafter(speculative, session.max_length),
                eos,
                stop_on_eos,
                on_new,
                on_prefill,
                room=session.max_length,
                stats=stats.speculative,
            )
            return
        generation_loop(
            step,
            feed,
            session.token_ids,
            max_new_tokens,
            sampling,
            eos,
            stop_on_eos,
            on_new,
            on_prefill,
        )

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close open sessions, stop the background loop and (if ours) the DHT."""
        if self._closed:
            return
        self._closed = True
        for s in list(self._active_sessions):
            try:
                s.close()
            except Exception as e:  # closing is best effort: peers free sessions on timeout
                logger.debug("closing a session: %r", e)
        try:
            self.loop.run(self.router.close(), timeout=5.0)
        except Exception as e:
            logger.debug("closing the router: %r", e)
        self.loop.close()
        if self._owns_dht and self.dht is not None:
            self.dht.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_compression(router_config: RouterConfig | None, compression: str | None) -> RouterConfig:
    """`router_config` (or the defaults) with `compression` filled in, never overriding a choice.

    Raises BadRequest when both name a codec and they differ.
    """
    rc = router_config or RouterConfig()
    if compression is None or compression == rc.compression:
        return rc
    if rc.compression != RouterConfig.compression:
        raise BadRequest(
            f"compression={compression!r} contradicts router_config.compression="
            f"{rc.compression!r}: give the codec once"
        )
    return dataclasses.replace(rc, compression=compression)
