"""Configuration of a Shared-Attention Llama (written by sa_train's export; needs transformers only).

A Llama configuration plus ``sa_groups``: groups of consecutive layers whose first layer (the anchor)
computes the attention weights that the group's other (shared) layers reuse with their own values.
Subclassing ``LlamaConfig`` keeps every Llama field and its handling (RoPE parameters, defaults).
"""

from transformers import LlamaConfig


class SALlamaConfig(LlamaConfig):
    model_type = "sa_llama"

    sa_groups: list | None = None

    def __post_init__(self, **kwargs):
        if self.sa_groups is None:
            self.sa_groups = [[layer] for layer in range(self.num_hidden_layers)]
        super().__post_init__(**kwargs)

    @property
    def anchors(self):
        """The layers that compute attention weights: the first of each group."""
        return [group[0] for group in self.sa_groups]
