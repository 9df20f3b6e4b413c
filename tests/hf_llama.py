"""A small random Hugging Face Llama folder as ``save_pretrained`` writes it: the input of the tests of
``convert --hf`` (GQA, 4 layers, a byte-level BPE of 300 tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from sa_train.data.tokenizer import train_bpe

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
LLAMA = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    initializer_range=0.1,  # attention far from uniform, so a wrong RoPE or head order shows in the logits
)


def write_llama_folder(folder: Path, tokenizer: bool = True, shard_size: str = "2GB", **config: Any):
    """Save a seeded random ``LlamaForCausalLM`` of ``LLAMA`` updated by ``config`` into ``folder`` (and a
    ``tokenizer.json`` unless ``tokenizer`` is false); returns the model, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama_config = transformers.LlamaConfig(**{**LLAMA, **config}, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(llama_config).eval()
    model.save_pretrained(folder, max_shard_size=shard_size)
    if tokenizer:
        bpe = train_bpe(datasets.Dataset.from_dict({"text": [TEXT]}), vocab_size=LLAMA["vocab_size"])
        bpe.save(str(folder / "tokenizer.json"))
    return model
