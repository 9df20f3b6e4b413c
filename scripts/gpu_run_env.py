"""What the steps of scripts/gpu_run.py run in: their environment variables, the wheels carried for the
packages the GPU machine lacks, the probe of versions and device for the summary, and the dry run's inputs
(a slice of the shipped corpus and tiny benchmark configs)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from gpu_run_steps import CORPUS, ROOT

WHEELS = ROOT / ".gpu_wheels"

# A tiny model for the dry run's benchmarks (their config files hold only what they read).
DRY_MODEL = {
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 4,
    "max_seq_len": 64,
}


def environment(dry: bool, work: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The steps' environment, after installing the carried wheels if datasets or jsonargparse is missing."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        TRITON_INTERPRET="1" if dry else "0",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
        # One thread: tiny ops gain nothing from more, and on a loaded 2-core CI machine spinning OpenMP
        # threads made a 6-step fit's decode check take 16 s instead of 0.5.
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    info = _probe(env)
    wheels = sorted(WHEELS.glob("*.whl"))
    if info.get("missing") and wheels:
        site = work / "site"
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        install += ["--no-cache-dir", "--target", str(site), *map(str, wheels)]
        done = subprocess.run(install, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # one unusable wheel fails them all: install the others one by one
            for wheel in wheels:
                subprocess.run([*install[: -len(wheels)], str(wheel)], capture_output=True, check=False)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
        info = _probe(env)
        info["wheels"] = {
            "installed": [w.name for w in wheels],
            "rc": done.returncode,
            "err": done.stderr[-2000:],
        }
    elif info.get("missing"):
        info["wheels"] = f"{info['missing']} missing and no wheels in {WHEELS} (see scripts/gpu_run.py)"
    return env, info


def _probe(env: dict[str, str]) -> dict[str, Any]:
    """Versions, the device, and which of the packages the GPU machine may lack do not import."""
    done = subprocess.run(
        [sys.executable, "-c", _VERSIONS], env=env, capture_output=True, text=True, check=False
    )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"probe_error": (done.stdout + done.stderr)[-2000:]}


_VERSIONS = """
import importlib.metadata as m, json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": __import__("os").cpu_count()}
for name in ("triton", "transformers", "lightning", "datasets", "jsonargparse", "tokenizers", "torchmetrics"):
    try:
        info[name] = m.version(name)
    except m.PackageNotFoundError:
        info[name] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}")
    try:
        q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        pass
missing = []
for name in ("datasets", "jsonargparse", "docstring_parser", "typeshed_client"):
    try:
        __import__(name)
    except ImportError:
        missing.append(name)
info["missing"] = missing
print(json.dumps(info))
"""


def dry_inputs(work: Path) -> dict[str, Path]:
    """A slice of the shipped corpus (40 documents of 4000 characters) and the tiny benchmark configs."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text = "".join(json.loads(line)["text"] for line in f)[:160_000]
    corpus = work / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"text": text[i * 4000 : (i + 1) * 4000]}) + "\n")
    files = {"corpus": corpus}
    for which, groups in (("sa", "every:2"), ("dense", "dense")):
        path = work / f"{which}-bench.yaml"
        config = {
            "model": {"config": {**DRY_MODEL, "sa_groups": groups}},
            "data": {"seq_len": 16, "batch_size": 2},
        }
        path.write_text(yaml.safe_dump(config))
        files[f"{which}_bench"] = path
    return files
