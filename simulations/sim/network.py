"""Links with latency and bandwidth: each node has an uplink and a downlink served in FIFO order.

Used by the churn simulator's strategies to time activations and gradients between peers.
"""

from __future__ import annotations

# Node id of the data loader / trainer: its link is assumed not to be the bottleneck.
SOURCE = -1


class Network:
    """Each node's uplink and downlink is a FIFO queue at full rate; a transfer uses one of each.

    A transfer of x seconds (bytes / bandwidth) takes the next x seconds of the sender's uplink and,
    independently, the next x seconds of the receiver's downlink; it arrives one latency after both
    are through. Both links stay work-conserving and reservations are O(1); the price is a fluid
    view (no fair sharing between concurrent flows, no packet-level coupling of the two ends).
    """

    __slots__ = ("latency_s", "bytes_per_s", "up_free", "down_free")

    def __init__(self, num_nodes: int, bandwidth_mbps: float, latency_ms: float) -> None:
        if bandwidth_mbps <= 0 or latency_ms < 0:
            raise ValueError("bandwidth must be > 0 and latency >= 0")
        self.latency_s = latency_ms / 1000.0
        self.bytes_per_s = bandwidth_mbps * 1e6 / 8.0
        self.up_free = [0.0] * num_nodes
        self.down_free = [0.0] * num_nodes

    def transfer_time(self, nbytes: float) -> float:
        """Seconds for `nbytes` on idle links, latency included."""
        return nbytes / self.bytes_per_s + self.latency_s

    def transfer(self, src: int, dst: int, nbytes: float, now: float) -> float:
        """Reserve links for `nbytes` from src to dst asked at `now`; returns the arrival time."""
        if src == dst:
            return now  # same machine: no link involved
        if nbytes <= 0:
            return now + self.latency_s
        duration = nbytes / self.bytes_per_s
        down = self.down_free
        end = (down[dst] if down[dst] > now else now) + duration
        down[dst] = end
        if src != SOURCE:
            up = self.up_free
            up_end = (up[src] if up[src] > now else now) + duration
            up[src] = up_end
            if up_end > end:
                end = up_end
        return end + self.latency_s

    def reset(self, node: int, now: float) -> None:
        """A node that left and came back has no transfers queued."""
        self.up_free[node] = now
        self.down_free[node] = now
