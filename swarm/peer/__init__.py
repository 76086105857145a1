"""The peer: serves a span of blocks over hivemind P2P and announces it on the DHT.

Used by the `swarm-peer` CLI, by clients in `petals_like` and by the SWARM trainer.
"""
