"""Decode speed on CPU: SAModel (an SA config and its dense twin) against HF Llama's generate.

Each variant generates ``--new`` tokens greedily after a ``--prompt``-token prompt for a batch of
``--batch`` rows (prefill included, no early stop); HF LlamaForCausalLM, shaped like the dense twin, uses
its static cache. Variants run interleaved, round by round, so machine noise hits all alike; the
script prints median new tokens per second and the ratios from the same run.

    python scripts/bench_decode.py --sa configs/sa-tiny.yaml --dense configs/dense-tiny.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from sa_train import SAConfig, SAModel


def model_config(path: str) -> SAConfig:
    with open(path) as f:
        return SAConfig(**yaml.safe_load(f)["model"]["config"])


def hf_llama(config: SAConfig) -> LlamaForCausalLM:
    """A randomly initialised HF Llama of the dense config's shape (speed does not depend on weights)."""
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.d_model,
            intermediate_size=config.ffn_hidden,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads,
            max_position_embeddings=config.max_seq_len,
            rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta,
            tie_word_embeddings=config.tie_embeddings,
        )
    ).eval()


def timer(generate: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        generate()
        return time.perf_counter() - start

    run()  # warm-up: allocator, thread pools, HF's cache set-up
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sa", default="configs/sa-tiny.yaml", help="config of the SA model")
    parser.add_argument("--dense", default="configs/dense-tiny.yaml", help="config of its dense twin")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=192, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=64, help="generated tokens per row")
    parser.add_argument("--rounds", type=int, default=5, help="timed generations per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sa, dense = model_config(args.sa), model_config(args.dense)
    prompt = torch.randint(0, dense.vocab_size, (args.batch, args.prompt))
    sa_model, dense_model, hf = SAModel(sa).eval(), SAModel(dense).eval(), hf_llama(dense)

    def hf_generate() -> object:
        return hf.generate(
            prompt,
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )

    with torch.inference_mode():
        variants = {
            "SAModel, SA config": timer(lambda: sa_model.generate(prompt, args.new)),
            "SAModel, dense twin": timer(lambda: dense_model.generate(prompt, args.new)),
            "HF Llama generate, static cache": timer(hf_generate),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                times[name].append(run())

    rates = {name: args.batch * args.new / statistics.median(values) for name, values in times.items()}
    hf_rate = rates["HF Llama generate, static cache"]
    print(
        f"batch {args.batch}, prompt {args.prompt} + {args.new} new tokens, greedy, {args.threads} threads, "
        f"{args.rounds} rounds (median), prefill included"
    )
    print(f"{'variant':34s} {'new tokens/s':>13s} {'vs HF':>8s}")
    for name, rate in rates.items():
        print(f"{name:34s} {rate:13.1f} {rate / hf_rate:7.2f}x")
    sa_over_dense = rates["SAModel, SA config"] / rates["SAModel, dense twin"]
    print(f"{'SA / its dense twin':34s} {'':13s} {sa_over_dense:7.2f}x")


if __name__ == "__main__":
    main()
