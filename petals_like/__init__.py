"""What a user of the mesh holds: a model whose blocks are remote, sessions that survive peer loss.

Imports `swarm`; `swarm` never imports it.
"""
