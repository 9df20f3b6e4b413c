"""An SA export against its dense twin's under ``transformers serve --continuous-batching``.

    python scripts/bench_serve.py [--config configs/sa-tiny.yaml] [--concurrency 8] [--requests 32]

Both exports are written here from random weights of the config's shape and of its dense twin (speed does
not depend on the weights; the tokenizer is trained on the shipped corpus). Both servers run at once, idle
but for the round in progress: rounds alternate SA, dense, SA, ... so machine noise hits both alike. Each
round sends ``--requests`` completions of ``--new`` tokens (the end-of-text token disabled, so every answer
has that length), ``--concurrency`` at a time; the report gives the median round's requests/s and new
tokens/s.

KV cache: bytes per cached token measured from the tensors transformers allocates for each model, in the
paged cache of continuous batching (its cache tensor less the two trash sectors, over the tokens its
blocks hold) and in the static cache of ``generate(cache_implementation="static")`` (keys and values of
every layer over its slots), and how many sequences of the requests' length a ``--kv-budget-mib`` budget
holds in each. ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import torch
import transformers
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from sa_train import SAModel
from sa_train.checkpoint import model_checkpoint
from sa_train.cost import dense_twin
from sa_train.data.datamodule import SHIPPED_CORPUS
from sa_train.data.tokenizer import train_bpe
from sa_train.export.serving import post, served
from sa_train.export.writer import export_checkpoint
from sa_train.run_config import read_training_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sa", "dense")


def corpus_text(chars: int) -> str:
    with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
        text = ""
        for line in f:
            text += json.loads(line)["text"]
            if len(text) >= chars:
                return text[:chars]
    return text


def write_exports(config_path: Path, folder: Path) -> dict[str, Path]:
    """The config's SA model and its dense twin, random weights, exported with one trained tokenizer."""
    config = read_training_config(config_path).config
    text = corpus_text(400_000)
    tokenizer = train_bpe(datasets.Dataset.from_dict({"text": text.split("\n\n")}), config.vocab_size)
    exports = {}
    for name, model_config in (("sa", config), ("dense", dense_twin(config))):
        torch.manual_seed(0)
        model = SAModel(model_config).eval()
        torch.save(model_checkpoint(model, tokenizer.to_str()), folder / f"{name}.ckpt")
        exports[name] = export_checkpoint(folder / f"{name}.ckpt", folder / name)
    return exports


def prompts_of(count: int, chars: int) -> list[str]:
    text = corpus_text(count * chars * 2)
    return [text[i * chars : (i + 1) * chars] for i in range(count)]


def one_round(url: str, model: Path, prompts: list[str], new: int, concurrency: int) -> dict[str, float]:
    """Seconds for all the prompts, ``concurrency`` requests in flight at a time; new and prompt tokens."""
    body = {
        "model": str(model),
        "max_tokens": new,
        "temperature": 0,
        "generation_config": '{"eos_token_id": -1}',
    }

    def complete(prompt: str) -> dict:
        return json.loads(post(f"{url}/v1/completions", {**body, "prompt": prompt}))["usage"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        usages = list(pool.map(complete, prompts))
    seconds = time.perf_counter() - start
    new_tokens = sum(usage["completion_tokens"] for usage in usages)
    if new_tokens != new * len(prompts):
        raise RuntimeError(
            f"{model.name}: {new_tokens} new tokens, not {new} for each of {len(prompts)} requests"
        )
    return {
        "requests_per_s": len(prompts) / seconds,
        "tokens_per_s": new_tokens / seconds,
        "prompt_tokens": statistics.mean(usage["prompt_tokens"] for usage in usages),
    }


def paged_bytes_per_token(model: torch.nn.Module) -> float:
    """Bytes per token of continuous batching's paged cache for ``model``, from its allocated tensor."""
    manager = model.init_continuous_batching(
        GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1),
        ContinuousBatchingConfig(num_blocks=16),
    )
    manager.start()
    try:
        manager.get_result(manager.add_request([1, 2, 3], max_new_tokens=2), timeout=120)
        cache = manager.batch_processor.cache
        (allocator,) = cache.cache_allocators.values()
        held_tokens = allocator.num_blocks * allocator.tokens_per_page
        return (cache.cache_tensor.nbytes - 2 * cache.bytes_per_sector) / held_tokens
    finally:
        manager.stop(block=True)


def static_bytes_per_token(model: torch.nn.Module) -> float:
    """Bytes per token slot of the static cache ``generate`` allocates for ``model`` (batch 1)."""
    with torch.no_grad():
        result = model.generate(
            torch.tensor([[1, 2, 3]]),
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=None,
            cache_implementation="static",
            return_dict_in_generate=True,
        )
    layers = result.cache.layers
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in layers) / layers[0].max_cache_len


def kv_report(
    exports: dict[str, Path], sequence_tokens: int, budget_bytes: int
) -> dict[str, dict[str, float]]:
    report = {}
    for name, folder in exports.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        per_token = {"paged": paged_bytes_per_token(model), "static": static_bytes_per_token(model)}
        report[name] = {
            **{f"{cache}_bytes_per_token": size for cache, size in per_token.items()},
            **{
                f"{cache}_sequences": budget_bytes // (size * sequence_tokens)
                for cache, size in per_token.items()
            },
        }
    return report


def format_report(report: dict) -> str:
    served_, kv, setup = report["served"], report["kv"], report["setup"]
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    lines = [
        f"machine: {setup['machine']}, {versions}, fp32",
        f"shape: {setup['config']} (SA groups {setup['groups']}); dense twin: every layer its own group",
        "",
        f"transformers serve --continuous-batching: {setup['requests']} requests of "
        f"~{setup['prompt_tokens']:.0f} prompt + {setup['new']} new tokens, {setup['concurrency']} at a "
        f"time, median of {setup['rounds']} rounds",
        "  model   requests/s   new tokens/s",
    ]
    for name in MODELS:
        lines.append(
            f"  {name:<7} {served_[name]['requests_per_s']:>10.2f}   {served_[name]['tokens_per_s']:>12.1f}"
        )
    ratio = served_["sa"]["tokens_per_s"] / served_["dense"]["tokens_per_s"]
    lines += [f"  SA / dense {ratio:.3f}x", ""]
    lines.append(
        f"KV cache, measured from the allocated tensors; sequences of {setup['sequence_tokens']} tokens in "
        f"{setup['kv_budget_mib']} MiB"
    )
    lines.append("  cache                       SA B/token  dense B/token  SA/dense   SA seqs  dense seqs")
    for cache, label in (("paged", "paged (continuous batching)"), ("static", "static (generate, compile)")):
        sa, dense = kv["sa"], kv["dense"]
        size, dense_size = sa[f"{cache}_bytes_per_token"], dense[f"{cache}_bytes_per_token"]
        lines.append(
            f"  {label:<27} {size:>10,.0f} {dense_size:>14,.0f} {size / dense_size:>9.3f} "
            f"{sa[f'{cache}_sequences']:>9,.0f} {dense[f'{cache}_sequences']:>11,.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", type=Path, default=ROOT / "configs" / "sa-tiny.yaml", help="a training YAML"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at a time (8)")
    parser.add_argument("--requests", type=int, default=32, help="requests per round (32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per model (3)")
    parser.add_argument("--prompt-chars", type=int, default=256, help="characters of corpus per prompt (256)")
    parser.add_argument("--new", type=int, default=32, help="new tokens per request (32)")
    parser.add_argument(
        "--kv-budget-mib", type=int, default=64, help="the KV budget sequences are counted in"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()

    config = read_training_config(args.config).config
    prompts = prompts_of(args.requests, args.prompt_chars)
    with tempfile.TemporaryDirectory() as folder:
        exports = write_exports(args.config, Path(folder))
        flags = ("--continuous-batching", "--cb-num-blocks", "64")
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in MODELS}
        with served({name: (exports[name], flags) for name in MODELS}, Path(folder)) as urls:
            for name in MODELS:  # warm-up: the first batch of each server builds its cache
                one_round(urls[name], exports[name], prompts[:2], 2, 2)
            for _ in range(args.rounds):
                for name in MODELS:
                    rounds[name].append(
                        one_round(urls[name], exports[name], prompts, args.new, args.concurrency)
                    )
        prompt_tokens = rounds["sa"][0]["prompt_tokens"]
        sequence_tokens = round(prompt_tokens) + args.new
        kv = kv_report(exports, sequence_tokens, args.kv_budget_mib * 2**20)
    median = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in rounds.items()
    }
    report = {
        "setup": {
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, each server "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
            "config": args.config.name,
            "groups": config.sa_groups,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "new": args.new,
            "prompt_tokens": prompt_tokens,
            "sequence_tokens": sequence_tokens,
            "kv_budget_mib": args.kv_budget_mib,
        },
        "served": median,
        "rounds": rounds,
        "kv": kv,
    }
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
