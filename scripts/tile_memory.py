"""Shared memory each kernel configuration needs on a GPU, from Triton's compiler, on any machine.

Runs every launcher of ``sa_train.kernels`` on small CPU tensors with Triton's launch replaced by a
recorder, once per rank of the tile lists (``sa_train.kernels.tiles``), then compiles each recorded
launch for the target GPU (``--arch``, no GPU needed: Triton ships ptxas) and reads the shared memory
the compiled kernel asks for. What the GPU would do at run time follows: the first configuration of
each list that fits ``--shared-memory`` bytes is the one its launches use.

``--registers`` adds what ptxas reports per configuration: registers per thread and bytes of register
spills (the group-fused backward spills at the tiles timed for the per-layer backward).

``--check`` exits 1 unless, for every dtype and head size asked, some configuration of every kernel
fits, and in bf16 and fp16 the first (tuned) one does. Triton fixes interpreter-vs-compiler at import,
so this must run without TRITON_INTERPRET (it sets it to 0 before importing anything).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "0"

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from sa_train.kernels import backward, decode, flash
from sa_train.kernels.tiles import candidates, gpu_tiles

H200 = (90, 232448)  # compute capability, opt-in shared memory per block in bytes
TILE_ARGS = {"BLOCK_M", "BLOCK_H", "BLOCK_N", "num_warps", "num_stages"}
KERNEL_OF = {
    "_forward_kernel": "forward",
    "_delta_kernel": "delta",
    "_backward_kernel": "backward",
    "_decode_kernel": "decode",
}
ARG_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel, its arguments, and the tile rank it was made at."""

    fn: JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def kernel(self) -> str:
        return KERNEL_OF[self.fn.__name__]

    def variant(self) -> tuple[tuple[str, Any], ...]:
        return tuple((k, v) for k, v in sorted(self.kwargs.items()) if k not in TILE_ARGS)

    def tiles(self) -> tuple[Any, ...]:
        return tuple(self.kwargs.get(k) for k in ("BLOCK_M", "BLOCK_H", "BLOCK_N", "num_warps", "num_stages"))


def _record(dtype: torch.dtype, head_dim: int, rank: int) -> list[Launch]:
    """Every kernel launch of a group of three's forward and backward, and of one decode step."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(Launch(self, args, kwargs))

    b, h, t, d = 1, 2, 256, head_dim
    q, k, v, v1, v2, out, dout = (torch.zeros(b, h, t, d, dtype=dtype) for _ in range(7))
    lse = torch.zeros(b, h, t)
    JITFunction.run = record
    try:
        with gpu_tiles(rank):
            flash.attention_forward(q, k, v, 0.1, None)
            flash.attention_forward(q, k, v1, 0.1, lse)
            backward.shared_backward(q, k, v1, out, dout, lse, 0.1)
            backward.anchor_backward(
                q, k, v, out, dout, lse, lse, torch.stack([v1, v2]), torch.stack([dout] * 2), 0.1
            )
            k_cache = torch.zeros(b, 1, t, d, dtype=dtype)
            decode.launch_decode(
                torch.zeros(b, h, 1, d, dtype=dtype),
                k_cache,
                torch.zeros(3, b, 1, t - 1, d, dtype=dtype),
                0.1,
            )
    finally:
        JITFunction.run = original
    return launches


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return ARG_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_for(launch: Launch, arch: int) -> Any:
    """The launch's kernel compiled for compute capability ``arch`` (a triton CompiledKernel)."""
    values = dict(zip(launch.fn.arg_names, launch.args, strict=False))  # kwargs follow
    values.update(launch.kwargs)
    signature = {
        p.name: "constexpr" if p.is_constexpr else _arg_type(values[p.name]) for p in launch.fn.params
    }
    constexprs = {p.name: values[p.name] for p in launch.fn.params if p.is_constexpr}
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    source = triton.compiler.ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def registers(compiled: Any, arch: int) -> tuple[int, int]:
    """(registers per thread, bytes of register spill stores) that ptxas reports for the compiled PTX,
    run the way Triton runs it (its ptxas and register-allocation level)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        command = [
            get_ptxas(arch).path,
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
        ]
        report = subprocess.run(
            [*command, str(ptx), "-o", str(Path(folder) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    used = re.search(r"Used (\d+) registers", report)
    spilled = re.search(r"(\d+) bytes spill stores", report)
    return int(used.group(1)) if used else 0, int(spilled.group(1)) if spilled else 0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, default=H200[0], help="compute capability, e.g. 90 (H100/H200), 80"
    )
    parser.add_argument("--shared-memory", type=int, default=H200[1], help="opt-in bytes per block")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--all", action="store_true", help="compile every configuration, not up to the first fit"
    )
    parser.add_argument(
        "--registers", action="store_true", help="also registers per thread and bytes spilled (ptxas)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a kernel has no fit or bf16 lost its tiles"
    )
    return parser.parse_args()


def main() -> int:
    args = _parse_args()
    problems = []
    print(f"sm_{args.arch}, {args.shared_memory} bytes of shared memory per block; * marks what launches use")
    header = f"{'dtype':9} {'D':>4}  {'kernel':7} {'variant':38} {'rank':>4}"
    print(f"{header}  tiles (m, h, n, warps, stages)  bytes")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for head_dim in args.head_dims:
            ranks = max(len(candidates(kernel, head_dim)) for kernel in KERNEL_OF.values())
            by_variant: dict[tuple[str, tuple], list[Launch]] = {}
            for rank in range(ranks):
                for launch in _record(dtype, head_dim, rank):
                    found = by_variant.setdefault((launch.kernel, launch.variant()), [])
                    if launch.tiles() not in [seen.tiles() for seen in found]:
                        found.append(launch)
            for (kernel, variant), launches in by_variant.items():
                fitted = None
                for rank, launch in enumerate(launches):
                    start = time.perf_counter()
                    compiled = compile_for(launch, args.arch)
                    need = compiled.metadata.shared
                    fits = need <= args.shared_memory
                    spills = ""
                    if args.registers:
                        spills = "{:4d} regs {:5d} B spilled ".format(*registers(compiled, args.arch))
                    mark = "*" if fits and fitted is None else " "
                    shown = ", ".join(f"{k}={v}" for k, v in variant if k != "HEAD_DIM")
                    print(
                        f"{dtype_name:9} {head_dim:4}  {kernel:7} {shown:38} {rank:4}  {launch.tiles()!s:30} "
                        f"{need:7d} {mark} {spills}({time.perf_counter() - start:.1f} s)",
                        flush=True,
                    )
                    if fits and fitted is None:
                        fitted = rank
                        if not args.all:
                            break
                if fitted is None:
                    problems.append(f"{dtype_name} D={head_dim} {kernel} {variant}: no configuration fits")
                elif fitted > 0 and dtype in (torch.bfloat16, torch.float16):
                    problems.append(
                        f"{dtype_name} D={head_dim} {kernel} {variant}: the tuned tiles no longer fit"
                    )
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
