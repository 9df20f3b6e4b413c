"""Incremental decoding against the full forward: prefill + one token at a time gives the same logits."""

from __future__ import annotations

import pytest
import torch

from sa_train import SAConfig, SAModel
from sa_train.cache import KVCache
from sa_train.cost import kv_cache_bytes_per_token
from sa_train.errors import ConfigError

SHAPES = {
    "dense": dict(sa_groups="dense", n_heads=4, n_kv_heads=4),
    "sa-pairs": dict(sa_groups="every:2", n_heads=4, n_kv_heads=4),
    "mixed-spans-gqa": dict(sa_groups=[[0], [1, 2, 3], [4, 5]], n_heads=4, n_kv_heads=2),
    "sa-mqa": dict(sa_groups="every:3", n_heads=4, n_kv_heads=1),
    "small-mixed-gqa": dict(n_layers=3, sa_groups=[[0], [1, 2]], n_heads=4, n_kv_heads=2),
}


def build(shape: str, backend: str) -> SAModel:
    torch.manual_seed(0)
    n_layers = 6 if shape != "sa-pairs" else 4
    config = SAConfig(
        vocab_size=97, d_model=64, n_layers=n_layers, max_seq_len=32, init_std=0.1, attention_backend=backend
    )
    config = SAConfig(**{**config.to_dict(), **SHAPES[shape]})
    return SAModel(config).eval()


def left_pad(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(len(row) for row in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, width - len(row) :] = row
    return batch


def assert_decoding_matches_forward(model: SAModel, prompt_lengths: list[int], new_tokens: int) -> None:
    """Every row: prefill its prompt, then feed its true continuation one token at a time; each step's
    logits must equal the full forward pass of that row alone at the same position."""
    sequences = [torch.randint(0, model.config.vocab_size, (n + new_tokens,)) for n in prompt_lengths]
    with torch.no_grad():
        want = [model(seq[None])[0] for seq in sequences]
        cache = KVCache(model.config, len(sequences), max(prompt_lengths) + new_tokens)
        prompts = left_pad([seq[:n] for seq, n in zip(sequences, prompt_lengths, strict=True)])
        got = [model.prefill(prompts, prompt_lengths, cache)]
        for step in range(new_tokens - 1):
            tokens = torch.stack([seq[n + step] for seq, n in zip(sequences, prompt_lengths, strict=True)])
            got.append(model.decode_step(tokens, cache))
            cache.advance()
    for row, n in enumerate(prompt_lengths):
        positions = torch.stack([logits[row] for logits in got])
        torch.testing.assert_close(positions, want[row][n - 1 : n - 1 + new_tokens], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("shape", ["dense", "sa-pairs", "mixed-spans-gqa", "sa-mqa"])
def test_incremental_decoding_equals_full_forward(shape, backend):
    """Row 0 starts from a single token, so every one of its positions is decoded incrementally;
    the other rows are left-padded."""
    assert_decoding_matches_forward(build(shape, backend), prompt_lengths=[1, 4, 6], new_tokens=9)


@pytest.mark.parametrize("padded", [False, True], ids=["equal-prompts", "padded"])
@pytest.mark.parametrize("shape", ["dense", "mixed-spans-gqa"])
def test_triton_decoding_equals_full_forward(shape, padded, monkeypatch):
    """The grouped decode kernel (Triton interpreter on CPU) serves unpadded batches; padded ones take the
    masked PyTorch path. Both equal the full forward."""
    from sa_train import kernels

    if not kernels.is_available():
        pytest.skip("triton cannot run here")
    launches = []
    kernel = kernels.decode_group_partial
    monkeypatch.setattr(kernels, "decode_group_partial", lambda *a: launches.append(1) or kernel(*a))
    model = build(shape, "triton")
    assert_decoding_matches_forward(model, prompt_lengths=[2, 5] if padded else [3, 3], new_tokens=4)
    assert len(launches) == (0 if padded else 3 * len(model.config.groups))


def test_cache_holds_a_value_per_layer_and_a_key_per_anchor():
    model = build("mixed-spans-gqa", "torch")
    cache = KVCache(model.config, batch_size=2, max_len=8)
    elements = sum(t.numel() for t in cache.tensors())
    assert elements * 2 == kv_cache_bytes_per_token(model.config) * 2 * 8  # 2 bytes/element in the cost model
    assert [g.values.shape[0] for g in cache.groups] == [1, 3, 2]


def test_decode_step_writes_the_cache_in_place():
    """A step reuses the preallocated buffers: same storage before and after, one new slot filled."""
    model = build("sa-pairs", "torch")
    cache = KVCache(model.config, batch_size=2, max_len=6)
    pointers = [t.data_ptr() for t in cache.tensors()]
    with torch.no_grad():
        model.prefill(torch.randint(0, 97, (2, 3)), [3, 3], cache)
        before = [t.clone() for t in cache.tensors()]
        model.decode_step(torch.tensor([5, 6]), cache)
    assert [t.data_ptr() for t in cache.tensors()] == pointers
    for old, new in zip(before, cache.tensors(), strict=True):
        changed = (old != new).any(dim=-1).nonzero()[:, -1].unique()  # the time index of changed entries
        assert changed.tolist() == [3]


def test_cache_longer_than_the_context_is_a_clear_error():
    with pytest.raises(ConfigError, match="max_seq_len=32"):
        KVCache(build("dense", "torch").config, batch_size=1, max_len=33)


@pytest.fixture
def fresh_dynamo():
    """Compiled code of earlier tests (e.g. a compiled fit in this process) must not count towards
    this test's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_forward_and_backward_trace_whole_under_compile(fresh_dynamo):
    """fullgraph=True fails on any graph break (a Python lookup, logging, an import in forward)."""
    model = build("small-mixed-gqa", "torch").train()
    ids = torch.randint(0, 97, (2, 12))
    probe = torch.randn(2, 12, 97)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(ids)
    got_grads = torch.autograd.grad((got * probe).sum(), list(model.parameters()))
    want = model(ids)
    want_grads = torch.autograd.grad((want * probe).sum(), list(model.parameters()))
    torch.testing.assert_close(got, want)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_step_compiles_once_and_replays_for_every_token(backend, fresh_dynamo):
    """One graph, no graph breaks, no recompilation as the cache fills: the step's shapes are static
    (the Triton backend's kernel reads a growing prefix, so a compiled step takes the static path)."""
    from sa_train import kernels

    if backend == "triton" and not kernels.is_available():
        pytest.skip("triton cannot run here")
    model = build("mixed-spans-gqa", backend)
    graphs = []

    def count_graphs(graph_module, _inputs):
        graphs.append(graph_module)
        return graph_module.forward

    step = torch.compile(model.decode_step, backend=count_graphs, fullgraph=True)
    ids = torch.randint(0, 97, (2, 10))
    cache = KVCache(model.config, batch_size=2, max_len=10)
    want = model(ids)
    with torch.no_grad():
        model.prefill(ids[:, :4], [4, 4], cache)
        for position in range(4, 10):
            logits = step(ids[:, position], cache)
            cache.advance()
            torch.testing.assert_close(logits, want[:, position], atol=1e-4, rtol=1e-4)
    assert len(graphs) == 1


def test_compiled_generation_equals_eager_and_writes_the_cache_in_place(fresh_dynamo):
    """Inductor's step gives the eager tokens, and no loop of its code spans a layer's whole value cache:
    a write into the view ``values[layer]`` once made every compiled step copy the group's cache."""
    from torch._inductor.utils import run_and_get_code

    model = build("small-mixed-gqa", "torch")
    prompts = torch.randint(0, 97, (2, 5))
    want = model.generate(prompts, max_new_tokens=6)
    got, code = run_and_get_code(model.generate, prompts, max_new_tokens=6, compile=True)
    assert got == want
    cache = KVCache(model.config, batch_size=2, max_len=5 + 6 - 1)
    layer_elements = cache.groups[1].values[0].numel()
    assert code and all(f"({layer_elements}L)" not in source for source in code)


def test_prompt_lengths_that_do_not_fit_the_cache_are_a_clear_error():
    model = build("dense", "torch")
    cache = KVCache(model.config, batch_size=2, max_len=8)
    for lengths, width in (([3, 4], 3), ([0, 3], 3), ([3], 3), ([9, 9], 9)):
        with pytest.raises(ConfigError, match="do not fit a cache of batch 2 and max_len 8"):
            model.prefill(torch.zeros(len(lengths), width, dtype=torch.long), lengths, cache)
