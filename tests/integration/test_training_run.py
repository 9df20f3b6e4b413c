"""Training runs through the CLI: mixed precision with clipping, compiled steps, non-finite losses."""

from __future__ import annotations

import csv
import importlib.util
import math

import pytest
import torch
import yaml
from test_cli import run_cli, run_module, tiny_run_config
from torch._dynamo.utils import counters

from sa_train import SAModel
from sa_train.tools.plot import read_metrics


def metrics(tmp_path, key: str) -> list[float]:
    rows = csv.DictReader((tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv").open())
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_mixed_fit_with_clipping_trains(tmp_path, small_corpus, capsys, optimizer):
    """The shipped 350M settings (bf16-mixed, clipping at 1.0, fused AdamW) on CPU: the first optimizer step
    used to raise "AdamW does not allow for gradient clipping". Muon (beside the fused AdamW) alike."""
    config = tiny_run_config(tmp_path, small_corpus)
    args = ["--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1.0", "--trainer.max_steps=12"]
    args.append(f"--model.optimizer={optimizer}")
    code, _, err = run_cli(["fit", "--config", str(config), *args], capsys)
    assert code == 0, err
    losses, norms = metrics(tmp_path, "train/loss"), metrics(tmp_path, "train/grad_norm")
    assert len(losses) == len(norms) == 12
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    assert all(math.isfinite(n) and n > 0 for n in norms)


@pytest.mark.slow
def test_compile_through_the_cli_runs_compiled_code(tmp_path, small_corpus, capsys):
    torch._dynamo.reset()  # an earlier compile of the same step in this process would be reused silently
    counters.clear()
    config = tiny_run_config(tmp_path, small_corpus)
    args = ["--trainer.max_steps=3", "--model.compile=true", "--trainer.val_check_interval=3"]
    code, _, err = run_cli(["fit", "--config", str(config), *args], capsys)
    assert code == 0, err
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert counters["frames"]["ok"] >= 1
    model = SAModel.from_checkpoint(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    assert torch.isfinite(model(torch.randint(0, 512, (1, 8)))).all()
    assert metrics(tmp_path, "val/ppl")


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    every_step = {
        "class_path": "sa_train.callbacks.LastStepCheckpoint",
        "init_args": {"every_n_train_steps": 1, "save_last": True},
    }
    args = [
        "--model.lr=1e6",
        "--model.warmup_steps=0",
        "--trainer.max_steps=30",
        f"--trainer.callbacks=[{yaml.safe_dump(every_step, default_flow_style=True).strip()}]",
    ]
    code, _, err = run_cli(["fit", "--config", str(config), *args], capsys)
    assert code == 2, err
    message = err[err.index("error:") :]
    assert "non-finite" in message or "became nan" in message, message
    assert "Traceback" not in err
    checkpoints = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert str(last) in message
    model = SAModel.from_checkpoint(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 30


@pytest.mark.slow
def test_fit_logs_perplexity_cost_and_throughput_to_csv_and_offline_wandb(tmp_path, small_corpus):
    pytest.importorskip("wandb")
    loggers = [
        {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}},
        {
            "class_path": "WandbLogger",
            "init_args": {"save_dir": str(tmp_path), "offline": True, "project": "t"},
        },
    ]
    callbacks = [
        {"class_path": "sa_train.callbacks.TrainingThroughput", "init_args": {"window": 2}},
        {"class_path": "sa_train.callbacks.InferenceCost"},
    ]
    extra = tmp_path / "loggers.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"logger": loggers, "callbacks": callbacks}}))
    config = tiny_run_config(tmp_path, small_corpus)
    args = ["--config", str(extra), "--trainer.max_steps=6", "--trainer.val_check_interval=3"]
    result = run_module(
        ["fit", "--config", str(config), *args], tmp_path, WANDB_MODE="offline", WANDB_SILENT="true"
    )
    assert result.returncode == 0, result.stderr[-3000:]

    losses, ppls = metrics(tmp_path, "val/loss"), metrics(tmp_path, "val/ppl")
    assert len(ppls) == 2 and ppls == pytest.approx([math.exp(loss) for loss in losses], rel=1e-5)
    assert metrics(tmp_path, "cost/kv_vs_dense") == [(4 + 2) / (2 * 4)]  # 4 layers, groups of 2
    assert all(rate > 0 for rate in metrics(tmp_path, "train/tokens_per_sec"))
    assert all(0 < mfu < 1 for mfu in metrics(tmp_path, "train/mfu"))
    logged = read_metrics(tmp_path / "runs" / "tiny" / "version_0")
    validated = [step for step, _ in logged["val/loss"]]
    assert [step for step, _ in logged["cost/decode_tokens_per_sec"]] == validated  # in each validation's row
    # 4 rows of 32 prompt + 32 new tokens; 6 vectors of 2 kv heads x 16 per token, fp32
    assert metrics(tmp_path, "cost/kv_cache_bytes") == [4 * 64 * 6 * 2 * 16 * 4] * 2
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = wandb_run.read_bytes()
    for key in (
        b"val/ppl",
        b"cost/kv_vs_dense",
        b"cost/decode_tokens_per_sec",
        b"train/tokens_per_sec",
        b"train/mfu",
        b"train/loss",
    ):
        assert key in recorded, key


def test_a_logger_whose_package_is_missing_is_one_clear_error(tmp_path, small_corpus, capsys):
    pytest.importorskip("lightning")
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed")
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(["fit", "--config", str(config), "--trainer.logger=MLFlowLogger"], capsys)
    assert code == 2
    assert "mlflow" in err and "pip install" in err and "Traceback" not in err


def test_validation_counts_optimizer_steps_and_runs_after_the_last(tmp_path, small_corpus, capsys):
    """val_check_interval is in optimizer steps, like max_steps (Lightning counts batches: with two
    batches per step it validated at steps 1, 2, 3, ...), and the last step is validated although 2
    does not divide 5 (Lightning stopped at max_steps without)."""
    config = tiny_run_config(tmp_path, small_corpus)
    args = ["--trainer.max_steps=5", "--trainer.accumulate_grad_batches=2", "--trainer.val_check_interval=2"]
    code, _, err = run_cli(["fit", "--config", str(config), *args, "--trainer.limit_val_batches=1"], capsys)
    assert code == 0, err
    rows = csv.DictReader((tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv").open())
    # after optimizer steps 2, 4 and 5; Lightning logs them at the step's index, as it logs train/loss
    assert [int(row["step"]) for row in rows if row.get("val/loss")] == [1, 3, 4]
