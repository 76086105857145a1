"""Experiments: the churn simulator, the real-process churn harness and benchmarks.

Each prints its figures; nothing imports this package but its own modules.
"""
