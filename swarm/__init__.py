"""Swarm Mesh: a peer-to-peer mesh that serves and trains Llama-family models in pipeline stages.

`swarm.model` holds the model, `swarm.peer` the server side, `swarm.training` SWARM training.
"""

__version__ = "0.1.0"
