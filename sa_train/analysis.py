"""How alike the attention of different layers is: the evidence for choosing SA groups.

Every layer that computes attention weights (every layer of a dense model, the anchors of an SA model)
yields P (B, H, T, T) on the same held-out tokens. Two layers are compared row by row: each row of P is a
distribution over the keys a query may see, and the measure is the Jensen–Shannon divergence in bits
(0 for equal rows, 1 for disjoint ones), reported as similarity = 1 − JS, and the cosine of the rows,
both averaged over rows, positions and batch. Heads of a dense model have no fixed order across layers,
so head pairs are compared three ways:

- ``index``: head h of one layer against head h of the other;
- ``matched``: the one-to-one pairing of heads that maximises the mean similarity (Hungarian algorithm),
  what the paper's retrofit permutes heads into;
- ``mean``: the head-averaged distributions against each other.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from sa_train.attention import causal_probs
from sa_train.cost import kv_fraction as cache_fraction
from sa_train.model import SAModel


@torch.no_grad()
def attention_maps(model: SAModel, input_ids: Tensor) -> dict[int, Tensor]:
    """P (B, H, T, T) in fp32 of every layer that computes attention weights, keyed by layer index."""
    rope = model.rope.prefix(input_ids.shape[1])
    x = model.embed(input_ids)
    maps = {}
    for group, layers in zip(model.groups, model.config.groups, strict=True):
        q, k = group.anchor.attn.queries_keys(group.anchor.attn_norm(x), rope)
        maps[layers[0]] = causal_probs(q.float(), k.float(), torch.float32)
        x = group.forward(x, rope, model.backend)
    return maps


def _row_js_bits(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence in bits between distributions along the last axis."""
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - m.clamp_min(1e-30).log()), 0.0).sum(-1)

    return (0.5 * (kl(p) + kl(q)) / math.log(2)).clamp(0.0, 1.0)


def _row_cosine(p: Tensor, q: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(p, q, dim=-1)


def head_pair_similarity(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(H, H) mean 1 − JS and mean cosine of every head of ``a`` against every head of ``b`` (B, H, T, T)."""
    heads = a.shape[1]
    js = torch.empty(heads, heads)
    cos = torch.empty(heads, heads)
    for i in range(heads):
        rows = a[:, i : i + 1]
        js[i] = 1.0 - _row_js_bits(rows, b).mean(dim=(0, 2))
        cos[i] = _row_cosine(rows, b).mean(dim=(0, 2))
    return js, cos


def _matched(pairs: Tensor) -> float:
    """Mean similarity of the best one-to-one pairing of heads (Hungarian algorithm on the pair matrix)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(pairs.numpy(), maximize=True)
    return float(pairs[rows, cols].mean())


@dataclass
class Similarity:
    """Layer × layer similarity matrices (``layers`` names the rows) and the per-head-pair detail."""

    layers: list[int]
    js: dict[str, list[list[float]]]
    cosine: dict[str, list[list[float]]]
    head_pairs: dict[str, list[list[float]]]


def similarity(maps: dict[int, Tensor]) -> Similarity:
    """Compare every pair of layers' attention (see the module docstring for the three head pairings)."""
    layers = sorted(maps)
    n = len(layers)
    js = {kind: [[1.0] * n for _ in range(n)] for kind in ("index", "matched", "mean")}
    cosine = {kind: [[1.0] * n for _ in range(n)] for kind in ("index", "matched", "mean")}
    head_pairs = {}
    for i in range(n):
        for j in range(i + 1, n):
            a, b = maps[layers[i]], maps[layers[j]]
            pair_js, pair_cos = head_pair_similarity(a, b)
            mean_a, mean_b = a.mean(1), b.mean(1)
            values = {
                "js": {
                    "index": float(pair_js.diagonal().mean()),
                    "matched": _matched(pair_js),
                    "mean": float(1.0 - _row_js_bits(mean_a, mean_b).mean()),
                },
                "cosine": {
                    "index": float(pair_cos.diagonal().mean()),
                    "matched": _matched(pair_cos),
                    "mean": float(_row_cosine(mean_a, mean_b).mean()),
                },
            }
            for kind in ("index", "matched", "mean"):
                js[kind][i][j] = js[kind][j][i] = values["js"][kind]
                cosine[kind][i][j] = cosine[kind][j][i] = values["cosine"][kind]
            head_pairs[f"{layers[i]}-{layers[j]}"] = pair_js.tolist()
    return Similarity(layers, js, cosine, head_pairs)


def neighbour_similarity(maps: dict[int, Tensor]) -> list[float]:
    """Head-matched similarity (1 − JS, bits) of each attention-computing layer with the next one: the
    neighbours of :func:`similarity`'s ``js["matched"]``, without the other pairs' cost."""
    layers = sorted(maps)
    return [_matched(head_pair_similarity(maps[a], maps[b])[0]) for a, b in itertools.pairwise(layers)]


def suggest_groups(matrix: list[list[float]], threshold: float) -> list[list[int]]:
    """Consecutive groups: a layer joins the open group while its similarity to the group's anchor is at
    least ``threshold``, else it anchors a new group (indices are rows of ``matrix``)."""
    groups: list[list[int]] = []
    for layer in range(len(matrix)):
        if groups and matrix[groups[-1][0]][layer] >= threshold:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def groups_for_budget(matrix: list[list[float]], max_anchors: int) -> tuple[list[list[int]], float]:
    """The groups of the highest threshold that leaves at most ``max_anchors`` anchors, and that threshold."""
    candidates = sorted({value for row in matrix for value in row}, reverse=True)
    for threshold in candidates:
        groups = suggest_groups(matrix, threshold)
        if len(groups) <= max_anchors:
            return groups, threshold
    return [list(range(len(matrix)))], -1.0


def anchors_for_kv_budget(n_layers: int, kv_fraction: float) -> int:
    """The most anchors whose KV cache (:func:`sa_train.cost.kv_fraction`) stays within ``kv_fraction`` of
    the dense one; at least 1."""
    fitting = [count for count in range(1, n_layers + 1) if cache_fraction(n_layers, count) <= kv_fraction]
    return max([1, *fitting])


def batches_of(tokens: Iterable[int], batch_size: int, seq_len: int, count: int) -> list[Tensor]:
    """Up to ``count`` (batch_size, seq_len) batches cut from a token stream, in order."""
    flat = torch.tensor(list(tokens), dtype=torch.long)
    per_batch = batch_size * seq_len
    usable = min(count, flat.numel() // per_batch)
    return [flat[i * per_batch : (i + 1) * per_batch].view(batch_size, seq_len) for i in range(usable)]
