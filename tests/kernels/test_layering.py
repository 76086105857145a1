"""Tests that `kernels` stays pure tensor math: it loads nothing of proto, swarm or protobuf.

Run by pytest (tests/kernels); a fresh interpreter, so other tests' imports do not hide a leak.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_imports_nothing_of_ours_but_kernels():
    code = (
        "import sys, kernels\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('proto', 'swarm', 'petals_like')"
        " or m.startswith('google.protobuf')]\n"
        "print(bad)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "[]"
