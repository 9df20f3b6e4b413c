"""Text generation with an :class:`~sa_train.SAModel`: token prompts in, new tokens out.

One call prefills the (left-padded) prompts through the training path into a static
:class:`~sa_train.cache.KVCache` sized for the call, then decodes one token per row per step. Sampling
(temperature, top-k, top-p) is a few torch ops written here: the model stays torch-only, and the
`transformers` logits processors it would otherwise borrow would pull that library in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sa_train.errors import ConfigError

if TYPE_CHECKING:
    from sa_train.model import SAModel

Prompts = Tensor | Sequence[Sequence[int]] | Sequence[int]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits.

    Args:
        temperature: 0 picks the most likely token (greedy); above 0 samples from softmax(logits / T).
        top_k: Sample only among the k most likely tokens. None = all.
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p (nucleus
            sampling), in (0, 1]. None or 1 = all.
        seed: Seed of the sampling generator, for repeatable samples. None = torch's global RNG.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(
                f"temperature={self.temperature} must be >= 0 (0 = greedy, 1 = the model's distribution)."
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be a positive number of tokens, or unset for all.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"top_p={self.top_p} must lie in (0, 1]: the probability mass of the most likely tokens to "
                "sample from (e.g. 0.9), or unset for all tokens."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf the logits (B, V) outside the top k and outside the smallest set of most likely
    tokens whose probability reaches top_p (the most likely token always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def next_tokens(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """The next token (B,) of each row from its logits (B, V)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _prompt_rows(prompts: Prompts, vocab_size: int) -> list[Tensor]:
    """One token tensor per prompt: from a (B, T) or (T,) tensor, a list of id lists or one id list."""
    if isinstance(prompts, Tensor):
        rows = list(prompts.reshape(-1, prompts.shape[-1]))
    else:
        rows = list(prompts)
        if rows and all(isinstance(token, int) for token in rows):
            rows = [rows]
    rows = [torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in rows]
    if not rows or any(len(row) == 0 for row in rows):
        raise ConfigError("every prompt needs at least one token; pass a non-empty list of ids per prompt.")
    for row in rows:
        if row.min() < 0 or row.max() >= vocab_size:
            raise ConfigError(
                f"prompt token ids must lie in 0..{vocab_size - 1} (model.config.vocab_size={vocab_size}); "
                "encode the prompt with the tokenizer the model was trained with."
            )
    return rows


def _check_room(longest: int, max_new_tokens: int, context: int) -> None:
    if longest > context:
        raise ConfigError(
            f"the prompt is {longest} tokens but the model's context is model.config.max_seq_len={context} "
            "tokens; shorten the prompt."
        )
    if not 1 <= max_new_tokens <= context - longest + 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} (--max-new-tokens) does not fit: a prompt of {longest} tokens "
            f"leaves room for 1..{context - longest + 1} new tokens in the model's context "
            f"(model.config.max_seq_len={context}); lower max_new_tokens or shorten the prompt."
        )


@torch.inference_mode()
def stream(
    model: SAModel,
    prompts: Prompts,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), step by step.

    Prompts of different lengths are left-padded. A row that has produced ``eos_token_id`` yields it
    again at every later step; generation stops when every row has, or after ``max_new_tokens``.
    ``compile`` decodes with the model's compiled step (:meth:`SAModel.compiled_decode_step`).
    """
    rows = _prompt_rows(prompts, model.config.vocab_size)
    lengths = [len(row) for row in rows]
    width = max(lengths)
    _check_room(width, max_new_tokens, model.config.max_seq_len)
    weight = model.embed.weight
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
    cache = model.new_cache(len(rows), width + max_new_tokens - 1)
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(weight.device).manual_seed(sampling.seed)
    decode_step = model.compiled_decode_step() if compile else model.decode_step
    logits = model.prefill(ids.to(weight.device), lengths, cache)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=weight.device)
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, sampling, generator)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(finished, eos_token_id)
            finished |= tokens == eos_token_id
        yield tokens
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        logits = decode_step(tokens, cache)
        cache.advance()


def generate(
    model: SAModel,
    prompts: Prompts,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt, up to and including its first ``eos_token_id``."""
    outputs: list[list[int]] = []
    for tokens in stream(model, prompts, max_new_tokens, sampling, eos_token_id, compile):
        outputs = outputs or [[] for _ in range(len(tokens))]
        for row, token in zip(outputs, tokens.tolist(), strict=True):
            if eos_token_id is None or not row or row[-1] != eos_token_id:
                row.append(token)
    return outputs
