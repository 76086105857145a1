"""Averaging among the replicas of one stage, and state download, through hivemind's averager.

Used by `swarm.training.stage.TrainableStage`: one averager (one prefix) per stage of a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.partition import AllreduceException

from swarm.dht_guard import GuardedMSGPackSerializer
from swarm.errors import PeerUnavailable

logger = logging.getLogger(__name__)

# hivemind's group-key buckets: the most replicas one round takes.
TARGET_GROUP_SIZE = 16
MAX_SAMPLES = 1 << 30  # a sample count a groupmate may tell

StateGetter = Callable[[], tuple[dict[str, Any], list[torch.Tensor]]]


class StageAverager(DecentralizedAverager):
    """A DecentralizedAverager whose downloadable state is whatever `state_getter` returns.

    averaged_tensors: the buffers one round averages in place (gradients and parameters).
    The downloadable state comes from `set_state_getter`'s callable, called in this process when
    a joining replica downloads it: (small msgpack-able metadata, tensors).
    """

    # Groupmates' gathered data and downloaded state metadata are msgpack from strangers: the
    # same scan as DHT values, so a nested bomb cannot crash the averager (hivemind's lines
    # averager.py 517-518 and 714 decode them with this serializer).
    serializer = GuardedMSGPackSerializer

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: DHT,
        *,
        prefix: str,
        min_matchmaking_time: float,
        request_timeout: float,
        next_chunk_timeout: float,
    ) -> None:
        self._state_getter: StateGetter | None = None
        self.buffers = list(averaged_tensors)
        super().__init__(
            averaged_tensors,
            dht,
            start=True,
            prefix=prefix,
            target_group_size=TARGET_GROUP_SIZE,
            min_group_size=2,
            min_matchmaking_time=min_matchmaking_time,
            request_timeout=request_timeout,
            next_chunk_timeout=next_chunk_timeout,
            # Short: a joining peer must find the replicas alive now, not those of a minute ago.
            declare_state_period=10.0,
            allow_state_sharing=False,
        )

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """hivemind's round, failed when a part came back missing.

        hivemind keeps our own values for the parts a groupmate did not return ("received 92.6%
        results") and calls the round a success; replicas then hold different weights for good.
        Failing the round instead sends this replica down the path of one that missed it.
        """
        await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        runner = self._running_groups[group_info.group_id if group_id is None else group_id]
        failed = runner.result().tensor_part_container.failed_size
        if failed:
            raise AllreduceException(f"{failed} averaged values did not come back from the group")

    async def _set_group_size(self, size: int) -> None:
        """In the averager's process: a leader starts the round once `size` peers are in it."""
        self._matchmaking.target_group_size = size

    def set_state_getter(self, getter: StateGetter) -> None:
        self._state_getter = getter

    def get_current_state(self):
        if self._state_getter is None:
            raise PeerUnavailable("this replica has no state to share yet")
        metadata, tensors = self._state_getter()
        return metadata, tensors, None

    def download_state(self, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """State of the replica with the highest priority (epoch); PeerUnavailable if none."""
        try:
            result = self.load_state_from_peers(wait=True, timeout=timeout)
        except Exception as e:
            raise PeerUnavailable(f"state download failed: {e!r}") from e
        if result is None:
            raise PeerUnavailable("no replica of this stage shared its state")
        metadata, tensors = result
        if not isinstance(metadata, dict):
            raise PeerUnavailable(f"replica sent bad state metadata {metadata!r}")
        return metadata, list(tensors)

    def average(
        self, weight: float, timeout: float, group: int = 0, samples: int = 0
    ) -> list[int | None]:
        """One all-reduce round with the stage's other replicas; each groupmate's `samples`.

        group: how many replicas will join (this one included); the round starts as soon as they
        did instead of at the end of the matchmaking time (0: unknown, wait it out).
        samples: what this replica's gradients hold, told to the group (ours is in the list; None
        where a replica of an earlier version told nothing).
        Raises PeerUnavailable when no group formed, the round failed (e.g. a peer left) or a
        groupmate told something that is not a sample count.
        """
        # Sent down the same pipe as the step, so the averager process applies it first.
        size = min(max(group, 2), TARGET_GROUP_SIZE) if group else TARGET_GROUP_SIZE
        self._outer_pipe.send(("_set_group_size", [], dict(size=size)))
        try:
            gathered = self.step(
                gather=int(samples), weight=weight, timeout=timeout, allow_retries=False, wait=True
            )
        except Exception as e:
            raise PeerUnavailable(f"averaging round failed: {e!r}") from e
        if not gathered:
            raise PeerUnavailable("averaging round found no group")
        counts = list(gathered.values())
        # From the network: a bool is an int to Python, a huge count would mask a short round.
        # None: a replica of an earlier version, which tells nothing.
        if not all(c is None or type(c) is int and 0 <= c <= MAX_SAMPLES for c in counts):
            raise PeerUnavailable("a groupmate told a bad sample count")
        return counts
