"""Torch-side completion of a decode step, once a layer knows its new token's values."""

from torch import Tensor


def decode_finish(partial: Tensor, p_last: Tensor, v_new: Tensor) -> Tensor:
    """out = partial + p_last·v_new for one layer.

    partial (B, H, D) fp32 and p_last (B, H) fp32 come from ``decode_group_partial``; v_new is the
    layer's value for the new token, (B, Hkv, 1, D). Returns (B, H, 1, D) in v_new's dtype.
    """
    num_heads = partial.shape[1]
    v = v_new[:, :, 0].float().repeat_interleave(num_heads // v_new.shape[1], dim=1)
    out = partial + p_last.unsqueeze(-1) * v
    return out.unsqueeze(2).to(v_new.dtype)
