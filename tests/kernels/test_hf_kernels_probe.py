"""Tests that our top-level `kernels` package does not break Hugging Face's probes for theirs.

Run by pytest (tests/kernels); a subprocess with the repository root first on sys.path.
"""

from pathlib import Path

import pytest

import kernels

ROOT = Path(__file__).resolve().parents[2]

HF_NAMES = [
    "get_kernel",
    "use_kernel_forward_from_hub",
    "LayerRepository",
    "LocalLayerRepository",
    "kernelize",
    "register_kernel_mapping",
    "replace_kernel_forward_from_hub",
    "use_kernel_mapping",
    "use_kernelized_func",
    "Device",
    "Mode",
    "KernelizeFallback",
    "CUDAProperties",
    "ROCMProperties",
    "get_local_kernel",
    "has_kernel",
    "__version__",
]


def test_defines_none_of_hf_kernels_names():
    assert [n for n in HF_NAMES if hasattr(kernels, n)] == []


def test_transformers_imports_beside_our_kernels(fresh_python):
    pytest.importorskip("transformers")
    code = (
        "import kernels, transformers\n"
        f"assert kernels.__file__.startswith({str(ROOT)!r})\n"
        "from transformers import LlamaForCausalLM\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "import transformers.integrations.hub_kernels as hk\n"
        "print('OK')\n"
    )
    proc = fresh_python(code, timeout=240)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
