"""Command-line entry points of the mesh (`swarm-peer`, `swarm-train`; the client CLIs use this
package too). Each module builds its parser from the component's config dataclass.

Importing it bounds how long idle OpenMP threads spin (GOMP_SPINCOUNT, read when torch loads, so
this import must precede torch's) unless the user set a wait policy: peers, trainers and clients
share cores. Spinning forever (OMP_WAIT_POLICY=ACTIVE, or libgomp's default of ~3 ms after each
op) took the CPU from the process that had work: `simulations.bench_peer`'s own 30-block step
took 260-780 ms beside six idle peers, 43-100 ms with sleeping threads. Sleeping at once
(PASSIVE) halved decode instead: SmolLM2 fp32 on 2 cores, 15.6 tok/s against 23.8 with
GOMP_SPINCOUNT=100000 (~0.4 ms of spin). swarm.threads keeps each process to one OpenMP team,
without which libgomp cuts every spin to 100 turns.
"""

import os

SPIN_COUNT = "100000"

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
