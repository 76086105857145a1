"""The peer's adapter cache: clients' LoRA / deep prompts, checked, content-hashed, bounded.

Used by the handler (`swarm.peer.handler`) for forwards, fine-tuning backwards and sessions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from swarm.errors import AdapterMissing, BadRequest, CacheFull
from swarm.model.config import ModelConfig
from swarm.model.lora import AdapterSpec, BlockTensors, adapter_hash, block_shapes


@dataclass
class AdapterEntry:
    """A checked adapter for blocks [first, last); `pins` counts sessions that use it."""

    hash: str
    spec: AdapterSpec
    tensors: BlockTensors
    first: int
    last: int
    nbytes: int
    pins: int = 0

    @property
    def has_prompts(self) -> bool:
        return self.spec.pre_seq_len > 0


class AdapterCache:
    """LRU of adapters by hash, at most `max_bytes` and `max_entries`; pinned ones stay.

    max_rank: the largest LoRA rank accepted; max_pre_seq_len: the longest deep prompt.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_bytes: int,
        max_entries: int,
        max_rank: int,
        max_pre_seq_len: int,
    ):
        self.config = config
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.max_rank, self.max_pre_seq_len = max_rank, max_pre_seq_len
        self._entries: OrderedDict[str, AdapterEntry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def max_elements(self) -> int:
        """The largest tensor an acceptable adapter holds (bounds decoding before allocation)."""
        c = self.config
        widest = max(c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim)
        return max(self.max_rank * widest, self.max_pre_seq_len * c.hidden_size, 1)

    def check_spec(self, spec: AdapterSpec) -> None:
        spec.check()
        if spec.rank > self.max_rank:
            raise BadRequest(f"LoRA rank {spec.rank} exceeds this peer's cap of {self.max_rank}")
        if spec.pre_seq_len > self.max_pre_seq_len:
            raise BadRequest(
                f"deep prompts of {spec.pre_seq_len} positions exceed this peer's cap of "
                f"{self.max_pre_seq_len}"
            )
        if spec.empty:
            raise BadRequest("the adapter is empty: no LoRA targets and no deep prompts")

    def get(self, key: str, first: int, last: int) -> AdapterEntry:
        """The cached adapter covering blocks [first, last); AdapterMissing if not held."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise AdapterMissing(f"adapter {key[:12]} is not cached here: send its tensors")
            self._entries.move_to_end(key)
        _check_covers(entry, first, last)
        return entry

    def put(
        self, key: str, spec: AdapterSpec, tensors: BlockTensors, first: int, last: int
    ) -> AdapterEntry:
        """Check `tensors` against the model and `key`, then cache them (evicting LRU ones).

        They must hold exactly the expected tensors of every block in [first, last).
        Raises BadRequest for bad shapes or a wrong hash, CacheFull if pinned ones fill the cache.
        """
        self.check_spec(spec)
        shapes = block_shapes(self.config, spec)
        if sorted(tensors) != list(range(first, last)):
            raise BadRequest(
                f"the adapter must hold blocks {first}:{last} exactly, got {sorted(tensors)[:8]}"
            )
        for block, ts in tensors.items():
            if set(ts) != set(shapes):
                raise BadRequest(
                    f"block {block}: adapter tensors {sorted(ts)} differ from {sorted(shapes)}"
                )
            for name, t in ts.items():
                if tuple(t.shape) != shapes[name] or t.dtype != torch.float32:
                    raise BadRequest(
                        f"block {block}: {name} is {t.dtype} {list(t.shape)}, expected float32 "
                        f"{list(shapes[name])}"
                    )
        if adapter_hash(spec, tensors) != key:
            raise BadRequest("the adapter's tensors do not match its hash")
        nbytes = sum(t.numel() * 4 for ts in tensors.values() for t in ts.values())
        if nbytes > self.max_bytes:
            raise BadRequest(
                f"the adapter takes {nbytes} bytes, more than this peer's cache of {self.max_bytes}"
            )
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._entries.move_to_end(key)
                return old
            self._make_room(nbytes)
            entry = AdapterEntry(key, spec, tensors, first, last, nbytes)
            self._entries[key] = entry
            return entry

    def _make_room(self, nbytes: int) -> None:
        used = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if used + nbytes <= self.max_bytes and len(self._entries) < self.max_entries:
                return
            if self._entries[key].pins == 0:
                used -= self._entries.pop(key).nbytes
        if used + nbytes > self.max_bytes or len(self._entries) >= self.max_entries:
            raise CacheFull(
                f"adapter cache full: {len(self._entries)} adapters in use by sessions hold "
                f"{used} of {self.max_bytes} bytes; retry later or elsewhere"
            )

    def pin(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.pins += 1

    def unpin(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.pins = max(0, entry.pins - 1)


def _check_covers(entry: AdapterEntry, first: int, last: int) -> None:
    if not entry.first <= first < last <= entry.last:
        raise BadRequest(
            f"adapter {entry.hash[:12]} covers blocks {entry.first}:{entry.last}, "
            f"not {first}:{last}"
        )
