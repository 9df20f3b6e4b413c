"""Measurements of this machine and of a model's decoding, shared by the training callbacks and ``bench``."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sa_train.model import SAModel


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """This CPU's fp32 matmul FLOP/s, the best of a few ``size``³ products: the MFU reference where no table
    of peaks applies (a CPU's sustained matmul rate, not its datasheet number)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure_decode(model: SAModel, batch_size: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """Prefill latency, decode tokens/s and KV-cache bytes of greedy decoding on a fixed random batch."""
    config = model.config
    new_tokens = min(new_tokens, config.max_seq_len - 1)
    prompt_len = max(1, min(prompt_len, config.max_seq_len - new_tokens))
    device = model.embed.weight.device
    ids = torch.randint(
        0, config.vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_cache(batch_size, prompt_len + new_tokens)
            synchronize(device)
            start = time.perf_counter()
            tokens = model.prefill(ids.to(device), [prompt_len] * batch_size, cache).argmax(-1)
            synchronize(device)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(new_tokens):
                tokens = model.decode_step(tokens, cache).argmax(-1)
                cache.advance()
            synchronize(device)
            decode = time.perf_counter() - start
    finally:
        model.train(was_training)
    return {
        "cost/prefill_ms": prefill * 1e3,
        "cost/decode_tokens_per_sec": batch_size * new_tokens / decode,
        "cost/kv_cache_bytes": float(sum(t.numel() * t.element_size() for t in cache.tensors())),
    }
