"""Input validation shared by the kernel launchers, so bad shapes fail with a message, not a wrong answer."""

import torch
from torch import Tensor


def head_dim_supported(head_dim: int) -> bool:
    """Kernels tile the head dimension whole; tl.arange needs a power of two and tl.dot at least 16."""
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def check_head_dim(head_dim: int) -> None:
    if not head_dim_supported(head_dim):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q (B, H, T, D); k, v (B, Hkv, T, D) with H % Hkv == 0, one dtype and one device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (B, heads, T, D)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if h % k.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({k.shape[1]})")
    check_head_dim(d)
    check_same_kind(q, k, v)


def check_same_kind(*tensors: Tensor) -> None:
    """One dtype (fp16/bf16/fp32) and one device for all operands."""
    first = tensors[0]
    if first.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {first.dtype}; use float16, bfloat16 or float32")
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError("all operands must share one dtype and one device")
