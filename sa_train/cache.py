"""The decode cache: static-shape key and value buffers of one batch, preallocated for its longest run.

Shared Attention caches less than a dense model: an anchor caches keys and values, a shared layer only
values (it reuses its anchor's attention weights), so a token costs L + #anchors vectors instead of 2L.
Each group's value caches lie together, (G, B, Hkv, max_len, D), the layout the grouped decode kernel
reads in one launch.

Batched prompts of different lengths are left-padded: every row writes its next token into the same
slot, so a decode step has one shape whatever the prompt lengths, and each row's last prompt token
sits in the last prefill slot. Per row, RoPE positions start at 0 after the padding, and an additive
mask (0 where a row may attend, -inf at its padding and at slots not written yet) keeps padding out.
All state a decode step reads is tensors updated in place, so the step allocates no cache memory and
can be compiled or captured as a CUDA graph; ``length`` (a Python int) serves the Triton kernel, which
reads only the written prefix, and the bounds checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sa_train.config import SAConfig
from sa_train.errors import ConfigError


@dataclass
class GroupCache:
    """One group's slice of the cache: its anchor's keys and the values of each of its layers."""

    keys: Tensor  # (B, Hkv, max_len, D)
    values: Tensor  # (G, B, Hkv, max_len, D), index 0 = the anchor
    layers: Tensor  # (G,) 0..G-1: index tensors that address one layer's values in place

    def write_prefix(self, layer: int, v: Tensor, k: Tensor | None = None) -> None:
        """Slots 0..T-1 of layer ``layer``'s values (B, Hkv, T, D), and of the keys for the anchor."""
        if k is not None:
            self.keys[:, :, : k.shape[2]] = k
        self.values[layer, :, :, : v.shape[2]] = v

    def write_step(self, layer: int, slot: Tensor, v: Tensor, k: Tensor | None = None) -> None:
        """One token's value (B, Hkv, 1, D) of layer ``layer`` (and the anchor's key) at ``slot`` (1,).

        The value goes in with one indexed write into the whole (G, ...) buffer, not a copy into the
        view ``values[layer]``: a compiled step turns a write into a view of its input into a copy of
        the group's whole value cache, which made the compiled CPU decode step of sa-tiny (batch 4,
        255 slots) slower than eager, 2.8 against 2.6 ms.
        """
        if k is not None:
            self.keys.index_copy_(2, slot, k)
        self.values[self.layers[layer : layer + 1], :, :, slot] = v.permute(2, 0, 1, 3)


class KVCache:
    """Keys and values of ``batch_size`` sequences of up to ``max_len`` tokens, for one model config."""

    def __init__(
        self,
        config: SAConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 1 <= max_len <= config.max_seq_len:
            raise ConfigError(
                f"a cache of max_len={max_len} tokens does not fit the model's context "
                f"(model.config.max_seq_len={config.max_seq_len}); use 1 <= max_len <= {config.max_seq_len}."
            )
        assert config.n_kv_heads is not None
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.max_len = max_len
        self.groups = [
            GroupCache(
                keys=torch.zeros(shape, dtype=dtype, device=device),
                values=torch.zeros((len(group), *shape), dtype=dtype, device=device),
                layers=torch.arange(len(group), device=device),
            )
            for group in config.groups
        ]
        self.bias = torch.full((batch_size, 1, 1, max_len), float("-inf"), dtype=dtype, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False
        if torch.device(device).type == "cuda":
            # Fixed addresses let a compiled step be captured once as a CUDA graph and replayed.
            indices = [group.layers for group in self.groups]
            for tensor in (*self.tensors(), *indices, self.bias, self.positions, self.slot):
                torch._dynamo.mark_static_address(tensor)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def tensors(self) -> list[Tensor]:
        """The key and value buffers, anchors' keys first per group."""
        return [t for group in self.groups for t in (group.keys, group.values)]

    def start(self, prompt_lengths: Sequence[int], padded_len: int) -> tuple[Tensor, Tensor | None]:
        """Reset for left-padded prompts of ``prompt_lengths`` in a (B, ``padded_len``) batch.

        Returns the prefill's RoPE positions (B, padded_len) and its additive mask (B, 1, T, T), None
        when no row is padded (then prefill is exactly the training forward). A padded query attends to
        itself, so its row stays finite; no real token attends to padding.
        """
        fits = len(prompt_lengths) == self.batch_size and padded_len <= self.max_len
        if not fits or not all(1 <= n <= padded_len for n in prompt_lengths):
            raise ConfigError(
                f"prompts of lengths {list(prompt_lengths)} padded to {padded_len} tokens do not fit a cache "
                f"of batch {self.batch_size} and max_len {self.max_len}; lengths must lie in 1..{padded_len}."
            )
        device = self.positions.device
        starts = torch.tensor([padded_len - n for n in prompt_lengths], device=device)
        slots = torch.arange(self.max_len, device=device)
        valid = (slots >= starts[:, None]) & (slots <= padded_len)  # the first decode slot included
        self.bias.copy_(_additive(valid, self.bias.dtype)[:, None, None])
        self.positions.copy_(torch.tensor(prompt_lengths, device=device))
        self.slot.fill_(padded_len)
        self.length = padded_len
        self.padded = padded_len != min(prompt_lengths)
        positions = (slots[:padded_len] - starts[:, None]).clamp(min=0)
        if not self.padded:
            return positions, None
        query, key = slots[:padded_len, None], slots[None, :padded_len]
        allowed = (key <= query) & (valid[:, None, :padded_len] | (key == query))
        return positions, _additive(allowed, self.bias.dtype)[:, None]

    def advance(self) -> None:
        """Book-keeping after a decode step wrote slot ``length``: the next token goes one slot on."""
        self.length += 1
        self.positions += 1
        self.slot += 1
        if self.length < self.max_len:
            self.bias[..., self.length] = 0.0


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as an additive attention bias: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )
