"""Definitions the tests hold the library to, written the slow and obvious way."""

from __future__ import annotations

import torch

from sa_train import SAModel


def greedy_by_full_forward(model: SAModel, prompt: list[int], new_tokens: int) -> list[int]:
    """The definition of greedy decoding: rerun the whole sequence, take the argmax, append."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]
