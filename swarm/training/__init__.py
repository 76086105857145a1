"""SWARM training: stochastic wiring, stage replicas that average, the trainer.

Used by training peers, `swarm-train` and the churn simulator.
"""
