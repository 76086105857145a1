"""Tests that `kernels` stays pure tensor math: it loads nothing of proto, swarm or protobuf.

Run by pytest (tests/kernels); a fresh interpreter, so other tests' imports do not hide a leak.
"""


def test_kernels_imports_nothing_of_ours_but_kernels(fresh_python):
    code = (
        "import sys, kernels\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('proto', 'swarm', 'petals_like')"
        " or m.startswith('google.protobuf')]\n"
        "print(bad)\n"
    )
    proc = fresh_python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "[]"
