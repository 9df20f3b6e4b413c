"""GPU tests: the Triton kernels compiled for CUDA, not interpreted. Run them with one command,

    TRITON_INTERPRET=0 python -m pytest tests/gpu

(``tests/conftest.py`` only sets TRITON_INTERPRET when it is unset). Without a CUDA device, or with the
interpreter on, every test here is skipped with the reason, so CI (CPU only) passes over them.
"""

import os
from collections.abc import Iterator

import pytest
import torch


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}:
        return (
            "needs compiled Triton: run with TRITON_INTERPRET=0 (tests/conftest.py turns the interpreter on)"
        )
    return None


@pytest.fixture(autouse=True)
def _cuda_and_compiled_triton() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _full_fp32_matmuls() -> Iterator[None]:
    """fp32 references (and fp32 kernels) use IEEE products, whatever a previous test set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)
