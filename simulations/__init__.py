"""Experiments: the churn simulator, the real-process churn harness and benchmarks.

Each prints its figures; nothing imports this package but its own modules. Importing it bounds
OpenMP's spin as the CLIs do (swarm/cli/__init__.py): a benchmark's own compute shares the cores
with the peers it started.
"""

import swarm.cli  # noqa: F401 - before torch: chooses OpenMP's wait policy
