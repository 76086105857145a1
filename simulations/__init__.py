"""Experiments: the churn simulator, the real-process churn harness and benchmarks.

Each prints its figures; nothing imports this package but its own modules. Importing it sets
OMP_WAIT_POLICY=PASSIVE (as the CLIs do, see swarm/cli/__init__.py): a benchmark's own compute
shares the cores with the peers it started.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
