"""Triton kernels for Shared Attention: anchor and shared flash attention, and grouped one-token decode.

With triton, importing registers the kernels as PyTorch operators (``torch.ops.sa_train.*``, see
``ops``) so that ``torch.compile`` traces through them. Importing never needs triton; without it the
kernel entry points raise RuntimeError and ``is_available()`` is False, while the PyTorch references
and ``decode_finish`` keep working.
"""

import os
from collections.abc import Callable
from typing import Any

import torch

from .finish import decode_finish
from .link import Link
from .reference import reference_anchor, reference_decode_group_partial, reference_shared

try:
    import triton  # noqa: F401
except ImportError:
    _HAS_TRITON = False
else:
    _HAS_TRITON = True

if _HAS_TRITON:
    from .ops import anchor_attention, decode_group_partial, shared_attention
else:

    def _missing(name: str) -> Callable[..., Any]:
        def unavailable(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError(f"sa_train.kernels.{name} needs triton, which is not installed")

        unavailable.__name__ = name
        return unavailable

    anchor_attention = _missing("anchor_attention")
    shared_attention = _missing("shared_attention")
    decode_group_partial = _missing("decode_group_partial")


def is_available() -> bool:
    """True when triton imports and there is somewhere to run it: a CUDA device or the interpreter."""
    interpret = os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}
    return _HAS_TRITON and (torch.cuda.is_available() or interpret)


__all__ = [
    "Link",
    "anchor_attention",
    "decode_finish",
    "decode_group_partial",
    "is_available",
    "reference_anchor",
    "reference_decode_group_partial",
    "reference_shared",
    "shared_attention",
]
