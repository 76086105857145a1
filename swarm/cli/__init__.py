"""Command-line entry points of the mesh (`swarm-peer`, `swarm-train`; the client CLIs use this
package too). Each module builds its parser from the component's config dataclass.

Importing it sets OMP_WAIT_POLICY=PASSIVE unless the user set it (it must precede torch's
import): peers, trainers and clients share cores, and OpenMP threads that spin while idle took
the CPU from the process that had work. Measured with `simulations.bench_peer`: the bench's own
30-block step 260-780 ms beside six idle peers with spinning threads, 43-100 ms with sleeping
ones, the remote steps unchanged.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
