"""The token embedding: nn.Embedding's values and gradients, and the same gradient every time compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sa_train import SAConfig, SAModel
from sa_train.embedding import TokenEmbedding
from sa_train.model import next_token_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_and_gradient_are_nn_embeddings_bitwise(dtype):
    torch.manual_seed(0)
    reference = nn.Embedding(64, 16).to(dtype)
    embedding = TokenEmbedding(64, 16).to(dtype)
    embedding.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 8, (4, 32))  # every id many times: the backward sums repeated rows
    upstream = torch.randn(4, 32, 16, dtype=dtype)
    lookup = torch.compile(embedding, backend="aot_eager")  # traced: through the custom operators
    assert torch.equal(lookup(ids), reference(ids))
    (lookup(ids) * upstream).sum().backward()
    (reference(ids) * upstream).sum().backward()
    assert torch.equal(embedding.weight.grad, reference.weight.grad)


def test_compiled_training_gives_the_same_gradients_every_time():
    """Inductor's own embedding backward adds repeated tokens' rows with atomic adds on parallel threads: on
    2 threads one backward in five gave another embedding gradient (issue 19). Through TokenEmbedding every
    repeat is bitwise the first, and the gradients are eager's to float tolerance."""
    torch.manual_seed(0)
    config = SAConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = SAModel(config)
    tokens = torch.randint(0, 16, (8, 65))  # 16 distinct ids in 512 positions: rows collide

    def gradients(loss_fn) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss_fn(tokens[:, :-1], tokens[:, 1:]).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return next_token_loss(model(inputs), targets)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compiled = torch.compile(loss, dynamic=False)
        first = gradients(compiled)
        for _ in range(9):
            again = gradients(compiled)
            assert all(torch.equal(again[name], grad) for name, grad in first.items())
    finally:
        torch.set_num_threads(threads)
    eager = gradients(loss)
    for name, grad in first.items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)
