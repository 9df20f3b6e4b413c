"""What a shared layer takes from its group's anchor besides q, k and lse (see ``ops``)."""

from typing import NamedTuple

from torch import Tensor


class Link(NamedTuple):
    """Placeholders whose gradients carry a shared layer's output gradient (B, H, T, D) and values
    (B, Hkv, T, D) back to its anchor, which computes the group's dq and dk from them."""

    dout: Tensor
    value: Tensor
