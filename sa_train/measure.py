"""Measurements of this machine and of a model's decoding, and how ``bench`` times and profiles: shared by
the training callbacks, ``bench`` and the benchmark scripts."""

from __future__ import annotations

import gzip
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from tqdm import tqdm

    from sa_train.model import SAModel

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device | None = None, repeats: int = 5) -> float:
    """This device's matmul FLOP/s, the best of a few products: fp32 1024³ on a CPU (its sustained rate,
    the MFU reference where no table of peaks applies), bf16 8192³ on a GPU."""
    device = device or torch.device("cpu")
    size, dtype = (1024, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(size, size, device=device, dtype=dtype)
    a @ a
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device) -> dict[str, float | None]:
    """The matmul peak measured now, and the table peak of a known GPU (Lightning's table; None on CPU)."""
    if device.type == "cpu":
        return {"measured": measure_matmul_flops(device), "table": None}
    from lightning.fabric.utilities.throughput import get_available_flops

    return {"measured": measure_matmul_flops(device), "table": get_available_flops(device, torch.bfloat16)}


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


def interleaved(timers: dict[str, Callable[[], T]], rounds: int, progress: tqdm) -> dict[str, list[T]]:
    """What each timer measures per call, round by round in a fixed order."""
    times: dict[str, list[T]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
            progress.update()
    return times


def spread(seconds: list[float]) -> float:
    """(max - min) / median of a variant's round times: how noisy its figure is."""
    return (max(seconds) - min(seconds)) / statistics.median(seconds)


def write_profile(folder: Path | None, name: str, device: torch.device, call: Callable[[], object]) -> None:
    """One more ``call`` under torch.profiler, into ``folder``: ``name``.txt, the 30 operators that took
    the most time of their own, and ``name``.json, its trace (chrome://tracing or ui.perfetto.dev)."""
    if folder is None:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        call()
        synchronize(device)
    order = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(profiler.key_averages().table(sort_by=order, row_limit=30))
    profiler.export_chrome_trace(str(folder / f"{name}.json"))


def cpu_name() -> str:
    """The CPU's model name where Linux says it (``platform.processor()`` is empty there), else its
    architecture: two studies of one code on two machines differed by more than their seeds did."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """``machine: cpu (x86_64), 16 threads, torch 2.13.0`` (with the GPU's name on CUDA)."""
    where = f"{info['device']} ({info['gpu'] if 'gpu' in info else info['cpu']})"
    return f"machine: {where}, {info['threads']} threads, torch {info['torch']}"


def measure_data_pipeline(
    corpus: Path, batch: int, seq_len: int, train_seconds_per_step: float | None
) -> dict[str, Any]:
    """Tokenisation MB/s of ``corpus`` (JSON lines with a ``text`` field) with a BPE trained on it
    (``prepare``'s own encoder), and the loader's cost per batch."""
    from sa_train.data import TokenDataModule
    from sa_train.data.shards import encode_documents

    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    with tempfile.TemporaryDirectory() as cache:
        data = TokenDataModule(source=str(corpus), seq_len=seq_len, batch_size=batch, cache_dir=cache)
        start = time.perf_counter()
        data.prepare_data()
        prepare_seconds = time.perf_counter() - start
        tokenizer_json = Path(data.tokenizer_path).read_text()
        encode_documents({"text": texts[:1]}, tokenizer_json, 0)  # parses the tokenizer once, untimed
        encode_times = []
        for _ in range(3):
            start = time.perf_counter()
            encode_documents({"text": texts}, tokenizer_json, 0)
            encode_times.append(time.perf_counter() - start)
        encode_seconds = statistics.median(encode_times)
        data.setup()
        loader = iter(data.train_dataloader())
        next(loader)
        count = 50
        start = time.perf_counter()
        for _ in range(count):
            next(loader)
        loader_seconds = (time.perf_counter() - start) / count
    return {
        "corpus_mb": megabytes,
        "tokenise_mb_per_sec": megabytes / encode_seconds,
        "prepare_seconds": prepare_seconds,
        "loader_ms_per_batch": loader_seconds * 1e3,
        "loader_share_of_step": loader_seconds / train_seconds_per_step if train_seconds_per_step else None,
    }
