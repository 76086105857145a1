"""Command-line entry points of the mesh (`swarm-peer`, `swarm-train`; the client CLIs use this
package too). Each module builds its parser from the component's config dataclass.

Importing it chooses how idle OpenMP threads wait (read when torch loads, so this import must
precede torch's), unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT: peers, trainers and
clients share cores. Serving and clients spin for about 0.4 ms (GOMP_SPINCOUNT=100000): a decode
step is hundreds of small ops, and threads that sleep at once (PASSIVE) halved it (SmolLM2 fp32
on 2 cores: 15.6 tok/s against 23.8), while spinning forever (ACTIVE, or libgomp's ~3 ms) took
the cores from the process that had work (`simulations.bench_peer`'s own step took 260-780 ms
beside six idle peers, 43-100 ms with sleeping threads). Training (`swarm-peer join --train`,
`swarm-train`) keeps PASSIVE: its peers compute at once on large ops, and spinning cost SWARM
10% (`simulations.bench_training --steps 10`: 15.0 and 17.2 samples/s against 16.6 and 19.3).
swarm.threads keeps each process to one OpenMP team, without which libgomp cuts every spin to
100 turns.
"""

import os
import sys

SPIN_COUNT = "100000"
CHOSEN = "SWARM_MESH_OPENMP"  # set with our choice: a child process of ours chooses for its role


def _training() -> bool:
    """`swarm-peer join --train` or the trainer (its script, `-m swarm.cli.train`, or `-c` code
    that imports it); the program is looked at, not its arguments, which may be any text."""
    argv = getattr(sys, "orig_argv", sys.argv)
    program = argv[: len(argv) - len(sys.argv) + 1]
    trainer = any("swarm.cli.train" in a or os.path.basename(a) == "swarm-train" for a in program)
    return trainer or "--train" in sys.argv[1:]


def _choose_wait_policy() -> None:
    if CHOSEN not in os.environ and {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        return  # the user's
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ.pop("GOMP_SPINCOUNT", None)
    if _training():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    os.environ[CHOSEN] = "1"


_choose_wait_policy()
