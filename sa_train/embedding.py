"""The token embedding, with a backward pass that gives the same gradient every time, compiled or not.

Inductor decomposes ``nn.Embedding``'s backward into a scatter-add that adds each token's gradient row
with atomic adds, on parallel CPU threads and in Triton alike, so the rows of a repeated token arrive in
a different order from run to run. Measured on this 2-core CPU with ``compile: true`` (the tiny model, 2
threads): one backward in five gave another ``embed.weight`` gradient, and a run resumed from its step-4
checkpoint ended 1.2e-7 away from the uninterrupted one, where eager runs are bitwise. Here the lookup and
its backward are custom operators, which Inductor calls as they are instead of decomposing: the backward
is ATen's ``embedding_dense_backward``, eager PyTorch's own, which sums each token's rows in a fixed order
(measured here on CPU; on CUDA it is not among the operations PyTorch lists as nondeterministic, but no GPU
has run this yet). Compiled training keeps everything else fused; what it gives up is fusing the row gather
into the first norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx


@torch.library.custom_op("sa_train::embedding_backward", mutates_args=())
def embedding_backward(grad: Tensor, ids: Tensor, num_embeddings: int) -> Tensor:
    """The gradient of the embedding table, ``(num_embeddings, dim)``, from the gradient of its rows."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_embeddings, -1, False)


@embedding_backward.register_fake
def _(grad: Tensor, ids: Tensor, num_embeddings: int) -> Tensor:
    return grad.new_empty(num_embeddings, grad.shape[-1])


@torch.library.custom_op("sa_train::embedding", mutates_args=())
def embedding(weight: Tensor, ids: Tensor) -> Tensor:
    """``weight[ids]``: one row of the table per token id."""
    return F.embedding(ids, weight)


@embedding.register_fake
def _(weight: Tensor, ids: Tensor) -> Tensor:
    return weight.new_empty(*ids.shape, weight.shape[-1])


def _save_ids(ctx: FunctionCtx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    weight, ids = inputs
    ctx.save_for_backward(ids)
    ctx.num_embeddings = weight.shape[0]


def _backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
    (ids,) = ctx.saved_tensors
    return embedding_backward(grad, ids, ctx.num_embeddings), None


embedding.register_autograd(_backward, setup_context=_save_ids)


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` (same parameter, same state-dict key) that goes through :func:`embedding` when
    traced by ``torch.compile``. Eager calls take ``nn.Embedding``'s own path, which already runs ATen's
    backward, without the custom operator's dispatch (whose first call also imports Triton)."""

    def forward(self, ids: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return embedding(self.weight, ids)
        return super().forward(ids)
