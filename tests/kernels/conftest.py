"""Fixtures of the kernels' tests: Python code run in a fresh interpreter on this tree.

Used by tests/kernels/test_*.py that must see what a bare `import kernels` does or sets up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_python() -> Callable[..., subprocess.CompletedProcess]:
    """run(code, timeout, **env): `python -c code` in the repository, this tree first on the path.

    A fresh interpreter, so that what other tests imported neither hides nor causes a result.
    """

    def run(code: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
