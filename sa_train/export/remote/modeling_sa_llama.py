"""Shared-Attention Llama for transformers (written by sa_train's export; needs torch and transformers only).

In each group of consecutive layers only the anchor computes queries, keys and the attention weights
P = softmax(QK^T / sqrt(d)) (causal); the group's shared layers apply that P to their own values. Every
layer keeps its own norms, value and output projections and MLP, so a model whose groups all have one
layer is exactly a Llama. Norms, MLP and rotary embedding are transformers' Llama modules; only the
attention is new. Its softmax runs in fp32, as in sa_train's training code, which the export's tests
compare these logits against.

The dynamic and static caches keep keys for anchors only: a shared layer's cache layer stores its values
and a key tensor of width zero, so they hold L + #anchors vectors per token instead of 2L. The paged cache of
continuous batching (``transformers serve --continuous-batching``) gives every layer of a model the same
pages, a key and a value row per token, and has no way to declare a values-only layer (its allocators are a
fixed table keyed by the config's layer types): a shared layer writes its values in both rows there, so the
paged cache is as large as the dense twin's while the answers are exact.
"""

import math
from typing import ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from .configuration_sa_llama import SALlamaConfig


class SharedAttentionCacheLayer(DynamicLayer):
    """Cache of a shared layer: its values only (its keys are its anchor's).

    The keys are kept as a tensor of width zero so that DynamicLayer's batch operations (beam reordering,
    cropping, repeating) apply unchanged while storing nothing.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(value_states[..., :0], value_states)

    def get_seq_length(self):
        return self.values.shape[-2] if self.is_initialized else 0


class SharedAttentionStaticLayer(StaticLayer):
    """Static (preallocated, compilable) cache of a shared layer: its values, and keys of width zero."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(value_states[..., :0], value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(value_states[..., :0], value_states)


def attention_mask_for(attention_mask, query_len, past_len, key_len, device):
    """Boolean (batch or 1, 1, query, key) mask: causal, minus padded keys, plus each query's own position.

    ``key_len`` is the length of the keys the cache returns: past + query for a dynamic cache, its whole
    length for a static one (whose unwritten slots the causal part masks). ``past_len`` may be a tensor (a
    static cache's count), so that a compiled step does not specialise on it. The own position keeps the
    softmax of a padded query (whose output nobody reads) finite.
    """
    query_pos = (torch.arange(query_len, device=device) + past_len)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "SALlamaModel takes a 2D attention_mask (batch, keys) of ones and zeros, or a 4D one "
                "(batch, 1, query, key) of booleans or additive biases."
            )
        padded = attention_mask.bool()
        if padded.shape[-1] < key_len:  # a static cache's slots after the mask are masked as the future
            padded = nn.functional.pad(padded, (0, key_len - padded.shape[-1]), value=True)
        mask = mask & padded[:, None, None, -key_len:]
    return mask | (key_pos == query_pos)[None, None]


def attention_weights(query, key, mask, dtype):
    """P = softmax(QK^T / sqrt(d)) over the allowed keys, in fp32, returned in ``dtype``.

    ``mask`` is boolean (True: allowed), or additive (0 or the dtype's minimum), as transformers builds it
    for a static cache and for continuous batching's packed sequences. Grouped-query attention: query head
    h reads key head h // (query heads / key heads).
    """
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (query @ key.transpose(-1, -2)) * (1.0 / math.sqrt(query.shape[-1]))
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores.float() + mask.float()
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)


def apply_weights(weights, value):
    """P·V where the query heads of one value head share it (batch, heads, query, head_dim)."""
    batch, n_heads, query_len, key_len = weights.shape
    n_kv = value.shape[1]
    out = weights.view(batch, n_kv, n_heads // n_kv, query_len, key_len) @ value[:, :, None]
    return out.view(batch, n_heads, query_len, value.shape[-1])


class SALlamaAttention(nn.Module):
    """An anchor projects Q, K and V and computes P; a shared layer projects only V and reuses P."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_anchor = layer_idx in config.anchors
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        if self.is_anchor:
            self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, mask, weights, store):
        """``store(key, value, layer)`` caches the new states and returns all of them (key None: shared)."""
        batch, length, _ = hidden_states.shape
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self.is_anchor:
            query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
            key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
            if store is not None:
                key, value = store(key, value, self.layer_idx)
            weights = attention_weights(query, key, mask, value.dtype)
        elif store is not None:
            _, value = store(None, value, self.layer_idx)
        out = apply_weights(weights, value).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), weights


class SALlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = SALlamaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states, position_embeddings, mask, weights, store):
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, mask, weights, store
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), weights


class SALlamaPreTrainedModel(PreTrainedModel):
    config_class = SALlamaConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["SALlamaDecoderLayer"]

    @classmethod
    def _can_set_attn_implementation(cls):
        """True: continuous batching switches an eager model to "paged|eager", and builds the mask of its
        packed sequences only then (transformers' guess reads this file, sees no AttentionInterface: no).

        The attention here is eager whatever the name (a shared layer needs P itself, which no fused kernel
        returns), and the model declares no SDPA or flash support, so transformers refuses every other name.
        """
        return True


class SALlamaModel(SALlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SALlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _lay_out(self, cache):
        """Make each shared layer of a dynamic or static cache values-only (generate makes them key-value)."""
        if not cache.layers:
            cache.layers.extend(DynamicLayer() for _ in range(self.config.num_hidden_layers))
        for index, layer in enumerate(cache.layers):
            if index in self.config.anchors or isinstance(
                layer, (SharedAttentionCacheLayer, SharedAttentionStaticLayer)
            ):
                continue
            if type(layer) is DynamicLayer and not layer.is_initialized:
                cache.layers[index] = SharedAttentionCacheLayer()
            elif type(layer) is StaticLayer and not layer.is_initialized:
                cache.layers[index] = SharedAttentionStaticLayer(max_cache_len=layer.max_cache_len)
            else:
                state = " holding keys" if layer.is_initialized else ""
                raise ValueError(
                    f"SALlamaModel caches only the values of a shared layer; layer {index} of the cache is a "
                    f"{type(layer).__name__}{state}. Use a DynamicCache (generate's default) or a "
                    "StaticCache (cache_implementation='static')."
                )

    def _store(self, cache, paged_kwargs):
        """The function the layers cache their states with, or None without a cache."""
        if cache is None:
            return None
        if not isinstance(cache, PagedAttentionCache):
            self._lay_out(cache)
            return cache.update
        # Paged: a shared layer writes its values as its keys too (its page has a key row either way); each
        # call gets its own copy of the batch's indices, which update() narrows to the layer in place.
        return lambda key, value, layer: cache.update(
            value if key is None else key, value, layer, dict(paged_kwargs)
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds.")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        store = self._store(cache, kwargs)
        length = hidden_states.shape[1]
        past_len = 0 if cache is None or isinstance(cache, PagedAttentionCache) else cache.get_seq_length()
        if attention_mask is not None and attention_mask.dim() == 4:
            # Built by transformers for the keys the cache returns: by generate for a static cache (fixed
            # shape, so that compiled steps do not recompile), by continuous batching for its packed rows.
            mask = attention_mask
        else:
            key_len = cache.get_mask_sizes(length, 0)[0] if cache is not None else length
            mask = attention_mask_for(attention_mask, length, past_len, key_len, hidden_states.device)
        if position_ids is None:
            position_ids = (torch.arange(length, device=hidden_states.device) + past_len)[None]
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        weights = None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, position_embeddings, mask, weights, store)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class SALlamaForCausalLM(SALlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = SALlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
