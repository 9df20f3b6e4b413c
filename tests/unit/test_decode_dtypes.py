"""Inference in every dtype a run can have: autocast bf16 / fp16 over fp32 weights (a bf16-mixed or
16-mixed run validating), and bf16 / fp16 weights (DeepSpeed's bf16 model, an export loaded in half).

The cache follows the dtype keys and values are computed in; prefill + decode equal the full forward of
the same setting within that dtype's rounding, and everything that decodes (generation, the
``InferenceCost`` measurement, the bench) runs in each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from references import greedy_by_full_forward

from sa_train import SAConfig, SAModel
from sa_train.callbacks import InferenceCost
from sa_train.cost import kv_cache_bytes_per_token
from sa_train.measure import measure_decode
from sa_train.tools import bench
from sa_train.training import CausalLM

SETTINGS = {
    # name: (weights' dtype, autocast dtype or None, the dtype keys and values are computed in)
    "autocast-bf16": (torch.float32, torch.bfloat16, torch.bfloat16),
    "autocast-fp16": (torch.float32, torch.float16, torch.float16),
    "bf16-weights": (torch.bfloat16, None, torch.bfloat16),
    "fp16-weights": (torch.float16, None, torch.float16),
    "fp32": (torch.float32, None, torch.float32),
}
# An incremental decode rounds in another order than the full forward (one token's keys against the
# whole sequence's), so in half precision they differ by rounding, not by a bound per element: decode must
# be as close to the fp32 computation as the forward of the same setting is (measured: its error is
# 0.4-1.1x the forward's in bf16), plus a little.
NOISE = 3.0


def build(sa_groups: object = "every:2", backend: str = "torch") -> SAModel:
    torch.manual_seed(0)
    config = SAConfig(
        vocab_size=61, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=24,
        sa_groups=sa_groups, init_std=0.3, attention_backend=backend,
    )  # fmt: skip
    return SAModel(config).eval()


@contextlib.contextmanager
def setting(model: SAModel, name: str) -> Iterator[torch.dtype]:
    """``model`` in the setting's weights, inside its autocast; yields the compute dtype."""
    weights, autocast, compute = SETTINGS[name]
    model.to(weights)
    with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
        yield compute


def decode(model: SAModel, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (B, T - prompt_len + 1, vocab) of prefill over ids[:, :prompt_len], then one step a token."""
    cache = model.new_cache(batch_size=ids.shape[0], max_len=ids.shape[1])
    got = [model.prefill(ids[:, :prompt_len], [prompt_len] * ids.shape[0], cache)]
    for position in range(prompt_len, ids.shape[1]):
        got.append(model.decode_step(ids[:, position], cache))
        cache.advance()
    return torch.stack(got, 1)


def assert_decode_as_close_as_the_forward(model: SAModel, name: str, prompt_len: int = 5) -> None:
    """Prefill + decode of the setting against the fp32 forward of the same weights, compared with the
    setting's own full forward; the cache holds the compute dtype."""
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with setting(model, name) as compute:
            assert {t.dtype for t in model.new_cache(2, 12).tensors()} == {compute}
            assert model.new_cache(2, 12).bias.dtype == compute
            forward = model(ids)[:, prompt_len - 1 :].float()
            got = decode(model, ids, prompt_len).float()
        exact = model.float()(ids)[:, prompt_len - 1 :]
    assert forward.dtype == torch.float32 and got.shape == exact.shape
    bound = NOISE * (forward - exact).abs().max() + 1e-4
    assert (got - exact).abs().max() <= bound, ((got - exact).abs().max(), bound)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("sa_groups", ["dense", "every:2"])
def test_prefill_and_decode_follow_the_compute_dtype_and_equal_the_forward(name, sa_groups):
    assert_decode_as_close_as_the_forward(build(sa_groups), name)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_generation_in_each_dtype_is_greedy_decoding_of_the_forward(name):
    """Padded prompts included: the additive mask is built in the cache's dtype too."""
    model = build()
    prompts = [[5, 9, 2, 7, 1], [3, 4]]
    with setting(model, name), torch.inference_mode():
        got = model.generate(prompts, max_new_tokens=6)
        want = [greedy_by_full_forward(model, prompt, 6) for prompt in prompts]
    assert got == want


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_inference_cost_measurement_runs_in_each_dtype(name):
    model = build()
    with setting(model, name) as compute:
        metrics = measure_decode(model, batch_size=2, prompt_len=5, new_tokens=3)
    per_token = kv_cache_bytes_per_token(model.config, torch.tensor([], dtype=compute).element_size())
    assert metrics["cost/kv_cache_bytes"] == 2 * (5 + 3) * per_token
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())


class _Batches(torch.utils.data.Dataset):
    """(inputs, targets) pairs of 12 tokens, as the data module yields them."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, 61, (13,), generator=torch.Generator().manual_seed(index))
        return ids[:-1], ids[1:]


def test_inference_cost_logs_at_every_validation_of_a_mixed_precision_run(tmp_path):
    """The crash of issue 19: fp32 weights, autocast keys, at the end of the first validation.
    (Lightning runs ``16-mixed`` as bf16-mixed on CPU; fp16 autocast is covered above.)"""
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=4)
    logged: list[dict[str, float]] = []

    class Logger(L.pytorch.loggers.CSVLogger):
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            logged.append(metrics)
            super().log_metrics(metrics, step)

    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=4, val_check_interval=2, limit_val_batches=1,
        callbacks=[InferenceCost(batch_size=2, prompt_len=4, new_tokens=2)], logger=Logger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(CausalLM(build().config, warmup_steps=1), loader, loader)
    cost = [m for m in logged if "cost/kv_cache_bytes" in m]
    per_token = kv_cache_bytes_per_token(build().config, 2)
    assert len(cost) == 2 and all(m["cost/kv_cache_bytes"] == 2 * 6 * per_token for m in cost)


def test_the_decode_bench_runs_under_the_autocast_it_uses_on_gpu(monkeypatch):
    """The bench decodes fp32 weights under bf16 autocast on CUDA; the same on CPU here."""

    def autocast(device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, torch.bfloat16)

    monkeypatch.setattr(bench, "autocast", autocast)
    run = bench.decode_timers("sa", build().config, torch.device("cpu"), compiled=False)
    seconds, peak = run(torch.randint(0, 61, (2, 6)), 4)
    assert seconds > 0 and peak is None


def test_the_triton_decode_kernel_takes_the_autocast_cache():
    """The grouped decode kernel (Triton interpreter) reads an fp16 cache under autocast. bf16 cannot be
    checked here (the interpreter multiplies bf16 bit patterns, see test_kernels_tiles); tests/gpu covers
    it."""
    from sa_train import kernels

    if not kernels.is_available():
        pytest.skip("triton cannot run here")
    assert_decode_as_close_as_the_forward(build("every:2", "triton"), "autocast-fp16")
