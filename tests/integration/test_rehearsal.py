"""Every shipped config, run as shipped: only sizes shrink.

Each ``configs/*.yaml`` is read and shrunk by the rules of :func:`rehearsal_config` (model width, depth,
vocabulary and context; a slice of the shipped corpus; batch, steps and intervals), so an edit to a shipped
config is rehearsed as soon as it lands, and a new config file is rehearsed without a line here. Everything
else is kept: precision, strategy and its settings, accumulation, clipping, compile, loader workers,
callbacks, logger. A config shipped in full precision is also rehearsed in both mixed precisions.

A rehearsal trains once uninterrupted; trains again and is SIGKILLed (the whole process group, as a
scheduler kills a job) between two checkpoints; resumes that run to the end; requires the resumed final
weights to equal the uninterrupted run's bitwise and its metrics to be finite; then runs ``validate``,
``test``, ``export`` (the Hugging Face model's logits against sa_train's), ``generate`` and ``eval`` on the
result, each as a user types it.

What CPU cannot run exactly as shipped, and the nearest setting used (the README says the same):

- ``accelerator: gpu`` and ``devices: auto`` run on the CPU; a DeepSpeed strategy on 2 CPU ranks over gloo
  through the tests' ``CPUDeepSpeedStrategy`` (the shipped stage and every shipped ``init_args``);
- ``bf16-mixed`` is CPU autocast (under DeepSpeed: DeepSpeed's bf16 weights with fp32 master weights,
  as on GPU); ``16-mixed`` is fp16 CPU autocast with a gradient scaler, through Lightning's
  ``MixedPrecision`` plugin, because Lightning itself turns ``16-mixed`` on CPU into bf16;
- ``attention_backend: auto`` resolves to the PyTorch path (the Triton kernels serve CUDA tensors), and
  ``compile: true`` compiles with Inductor's CPU code.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_cli import ROOT, kill_module_when, run_cli, run_module, run_modules_together

from sa_train import SAConfig, SAModel
from sa_train.checkpoint import RESUMED_FROM, read_checkpoint

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
# Optimizer steps of a rehearsal: the fewest that cross the warmup, validate twice after the resume and
# checkpoint at 3, 6 and 8 (12 steps cost the DeepSpeed rehearsals a third more for no other path).
STEPS = 8
EVERY = 3  # validation and checkpoint interval; fit also validates after its last step
WARMUP = 2
KILL_AT = 4  # the kill comes after the step-3 checkpoint and before the step-6 one
# The smallest shapes that keep every code path: bf16 and fp16 on a CPU without native support are
# emulated, and a DeepSpeed rehearsal (8 micro-batches a step, 2 ranks, compiled) spent 54 of its 98 s per
# fit computing at width 64, sequences of 64 and batch 4; at 32, 32 and 2 it spends 13 s.
WIDTH = 32
CONTEXT = 32
MIXED = ("bf16-mixed", "16-mixed")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Metrics every rehearsal must log, finite, in the resumed run's metrics file.
REQUIRED = ("val/loss", "val/ppl", "train/tokens_per_sec", "train/mfu", "cost/kv_cache_bytes")


def rehearsals() -> list[Any]:
    """(config file, precision override) for every shipped config; a full-precision one in each mixed too."""
    cases = []
    for path in SHIPPED:
        shipped = yaml.safe_load(path.read_text())["trainer"].get("precision", "32-true")
        variants = [None, *MIXED] if shipped in ("32-true", "32", 32) else [None]
        cases += [pytest.param(path, v, id=path.stem + (f"-{v}" if v else "")) for v in variants]
    return cases


def rehearsal_config(
    shipped: dict[str, Any], corpus: Path, work: Path, precision: str | None
) -> dict[str, Any]:
    """``shipped`` with only its sizes shrunk and its outputs under ``work``; see the module docstring."""
    config = yaml.safe_load(yaml.safe_dump(shipped))  # a deep copy
    model = config["model"]
    size = SAConfig(**model["config"])
    heads = 4
    model["config"].update(
        vocab_size=512,
        d_model=WIDTH,
        n_layers=min(size.n_layers, 8),
        n_heads=heads,
        n_kv_heads=max(1, heads * (size.n_kv_heads or size.n_heads) // size.n_heads),
        max_seq_len=CONTEXT,
    )
    if size.ffn_hidden is not None:
        model["config"]["ffn_hidden"] = round(WIDTH * size.ffn_hidden / size.d_model)
    model["warmup_steps"] = WARMUP
    data = config["data"]
    data.update(source=str(corpus), text_field="body", vocab_size=512, seq_len=CONTEXT, batch_size=2)
    data.update(cache_dir=str(work.parent / "cache"), val_fraction=0.05)
    if "hub_subset" in data:
        data["hub_subset"] = None
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", max_steps=STEPS, val_check_interval=EVERY, limit_val_batches=2)
    trainer.update(log_every_n_steps=1, default_root_dir=str(work / trainer["default_root_dir"]))
    trainer["logger"]["init_args"]["save_dir"] = str(work / trainer["logger"]["init_args"]["save_dir"])
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and strategy["class_path"].endswith("DeepSpeedStrategy"):
        strategy["class_path"] = "distributed_helpers.CPUDeepSpeedStrategy"
        trainer["devices"] = 2
    elif trainer.get("devices") == "auto":
        trainer["devices"] = 1
    for callback in trainer["callbacks"]:
        if "every_n_train_steps" in callback.get("init_args", {}):
            callback["init_args"]["every_n_train_steps"] = EVERY
    if precision == "16-mixed":
        trainer.pop("precision", None)
        plugin = "lightning.pytorch.plugins.precision.MixedPrecision"
        trainer["plugins"] = {"class_path": plugin, "init_args": {"precision": "16-mixed", "device": "cpu"}}
    elif precision is not None:
        trainer["precision"] = precision
    return config


def fit(config: Path, *args: str, capsys: pytest.CaptureFixture[str] | None = None) -> None:
    tool(["fit", "--config", str(config), *args], config.parent, capsys)


def fit_and_kill(config: Path, at_step: int) -> None:
    """Start ``fit`` and SIGKILL it once rank 0 has finished optimizer step ``at_step``."""
    marker = config.parent / "step"
    callback = ["--trainer.callbacks+=distributed_helpers.StepMarker", f"--trainer.callbacks.path={marker}"]
    args = ["fit", "--config", str(config), *callback]

    def reached() -> bool:
        return marker.exists() and int(marker.read_text() or 0) >= at_step

    kill_module_when(args, config.parent, reached, timeout=400, DS_ACCELERATOR="cpu")
    assert at_step <= int(marker.read_text()) < STEPS


def metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Each metric of a CSVLogger run folder: its (step, value) rows."""
    found: dict[str, list[tuple[int, float]]] = {}
    with (run / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name != "step" and value:
                    found.setdefault(name, []).append((int(row["step"]), float(value)))
    return found


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name, tensor in expected.items() if not torch.equal(actual[name], tensor)]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different}"


def tool(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str] | None = None) -> str:
    """A command as a user types it; in this process when ``capsys`` is given, else as ``python -m
    sa_train`` offline. In this process saves the ~12 s of imports a fresh one costs on a 2-core machine
    (lightning and torchmetrics), which was most of a rehearsal's time; a run with two ranks needs its own
    process, which Lightning's launcher starts again for the second rank."""
    if capsys is not None:
        code, out, err = run_cli(args, capsys)
        assert code == 0, err[-5000:]
        return out
    result = run_module(args, cwd, DS_ACCELERATOR="cpu", **OFFLINE)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout


def newest_run(runs: Path) -> Path:
    return max(runs.glob("version_*"), key=lambda path: int(path.name.split("_")[1]))


def assert_export_matches(checkpoint: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Hugging Face export's logits are sa_train's, through transformers' own loading."""
    from transformers import AutoModelForCausalLM

    tool(["export", "--checkpoint", str(checkpoint), "--out", str(work / "hf")], work, capsys)
    exported = AutoModelForCausalLM.from_pretrained(work / "hf", trust_remote_code=True).eval()
    model = SAModel.from_checkpoint(checkpoint).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, model(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("shipped", "precision"), rehearsals())
def test_shipped_config_trains_resumes_bitwise_and_serves(shipped, precision, tmp_path, small_corpus, capsys):
    name = yaml.safe_load(shipped.read_text())["trainer"]["logger"]["init_args"]["name"]
    configs = {}
    for run in ("uninterrupted", "killed"):
        (tmp_path / run).mkdir()
        config = rehearsal_config(
            yaml.safe_load(shipped.read_text()), small_corpus, tmp_path / run, precision
        )
        configs[run] = tmp_path / run / "config.yaml"
        configs[run].write_text(yaml.safe_dump(config))
    one_process = config["trainer"].get("devices", 1) == 1

    work, in_process = tmp_path / "killed", capsys if one_process else None
    fit(configs["uninterrupted"], capsys=in_process)
    fit_and_kill(configs["killed"], KILL_AT)
    runs = tmp_path / "killed" / "runs" / name
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    fit(configs["killed"], f"--ckpt_path={last}", capsys=in_process)

    resumed = newest_run(runs)
    assert (resumed / RESUMED_FROM).resolve() == (runs / "version_0").resolve()  # plot joins the parts
    final = resumed / "checkpoints" / "last.ckpt"
    reference = tmp_path / "uninterrupted" / "runs" / name / "version_0"
    assert read_checkpoint(final).global_step == STEPS
    want = read_checkpoint(reference / "checkpoints" / "last.ckpt").state_dict
    assert_bitwise_equal(read_checkpoint(final).state_dict, want)

    logged = metrics(resumed)
    for metric in REQUIRED:
        assert metric in logged and all(math.isfinite(v) for _, v in logged[metric]), (metric, sorted(logged))
    validated = sorted(step for step, _ in logged["val/loss"])
    assert validated[0] > KILL_AT - EVERY and len(validated) >= 2, validated  # after the resume, twice
    uninterrupted = dict(metrics(reference)["val/loss"])
    assert all(uninterrupted[step] == value for step, value in logged["val/loss"]), (uninterrupted, logged)

    # The final weights evaluate to the fit's last validation, value for value, in the run's precision.
    tool(["validate", "--config", str(configs["killed"]), f"--ckpt_path={final}"], work, in_process)
    assert metrics(resumed / "validate")["val/loss"][-1][1] == uninterrupted[max(uninterrupted)]
    if precision is not None:
        return  # the checkpoint of a mixed-precision variant is the same fp32 file as the shipped one's
    assert_export_matches(final, work, capsys)
    prompt = ["--prompt", "To be, or not", "--max-new-tokens", "8"]
    assert tool(["generate", "--checkpoint", str(final), *prompt], work, capsys).strip()
    if not one_process:
        # `test` is `validate`'s loop on another split, and `eval` reads the export, which is the same for
        # every strategy: both run in the one-process rehearsals, which need no start-up of two ranks with
        # a compile each (the DeepSpeed rehearsals were the two longest tests of the suite with them).
        return
    tool(["test", "--config", str(configs["killed"]), f"--ckpt_path={final}"], work, in_process)
    assert math.isfinite(metrics(resumed / "test")["test/loss"][-1][1])
    evaluation = ["--tasks", "shakespeare_milton_ppl", "--limit", "3"]
    tool(["eval", "--model", str(work / "hf"), *evaluation], work, capsys)


@pytest.mark.slow
def test_repeated_resumes_of_one_checkpoint_are_bitwise_every_time(tmp_path, small_corpus, capsys):
    """Issue 19 saw one resume in three end 0.0163 away from the uninterrupted run. Three resumes of one
    step-3 checkpoint, started together in one runs folder as a sweep would start them (the load and the
    shared folder were the suspects), each end bitwise on the uninterrupted run."""
    config = rehearsal_config(
        yaml.safe_load((ROOT / "configs" / "sa-tiny.yaml").read_text()), small_corpus, tmp_path, None
    )
    config["trainer"]["callbacks"][-1]["init_args"].update(save_top_k=-1, filename="{step}")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    fit(path, capsys=capsys)
    runs = tmp_path / "runs" / config["trainer"]["logger"]["init_args"]["name"]
    checkpoints = runs / "version_0" / "checkpoints"
    resume = ["fit", "--config", str(path), f"--ckpt_path={checkpoints / f'step={EVERY}.ckpt'}"]
    run_modules_together([resume] * 3, tmp_path)
    want = read_checkpoint(checkpoints / "last.ckpt").state_dict
    finals = sorted(runs.glob("version_*/checkpoints/last.ckpt"))
    assert len(finals) == 4
    for final in finals:
        assert read_checkpoint(final).global_step == STEPS
        assert_bitwise_equal(read_checkpoint(final).state_dict, want)
