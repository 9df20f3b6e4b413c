"""The numeric types sa_train names, stated once: ``fp32``, ``bf16`` and ``fp16``.

The names are what users type (``export --dtype``, ``cost --dtype``) and what the cost tables print; a
Trainer ``precision`` maps to the name of the type its matmuls and its KV cache use.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str | int) -> str:
    """The name of the compute dtype under a Trainer ``precision``: ``bf16-mixed`` and ``bf16-true`` ->
    ``bf16``, ``16-mixed`` and ``16-true`` -> ``fp16``, anything else (``32-true``, ``64``) -> ``fp32``."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "fp32"


def bytes_per_element(name: str) -> int:
    """Bytes one element of the named type takes."""
    return DTYPES[name].itemsize
