"""DeepSpeed ZeRO and DDP on two CPU processes, and exact resume, all through ``python -m sa_train fit``.

The reference for a two-process run is one process with twice the micro-batch: the loader deals each
epoch's permutation round-robin to ranks, so at every step the two ranks together hold exactly the samples
of the single process's batch, and the averaged gradient is the same sum. What differs is the order of
float additions (gloo all-reduce, ZeRO's flat fp32 buckets), so curves agree to a tolerance, not bitwise.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from test_cli import run_module, tiny_run_config

from sa_train import SAModel
from sa_train.checkpoint import read_checkpoint
from sa_train.checkpoint_io import AtomicCheckpointIO
from sa_train.cli import main
from sa_train.errors import CheckpointError
from sa_train.trainer_cli import SACLI

# The DDP and accumulation tests need no DeepSpeed; `pip install -e ".[dev]"` installs it for the rest.
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="no DeepSpeed")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
MICRO_BATCH = 8
# Two ranks against one process on the same samples (fp32, 8 AdamW steps at lr 3e-3, ZeRO-2 and -3 alike):
# measured max differences 1.4e-6 in the loss and 1.5e-6 in a weight; the bounds leave ~70x for other
# BLAS builds and thread counts.
LOSS_TOL = 1e-4
WEIGHT_TOL = 1e-4
# Muon orthogonalises in bf16 (torch's Newton-Schulz), so the last-bit differences of the all-reduced
# gradient can flip bf16 roundings: measured 6.1e-4 in a weight after 8 steps with a switch to SA at step 3
# (1.8e-4 without), while the losses stay within 3e-5.
MUON_WEIGHT_TOL = 3e-3


def checkpoints_every(dirpath: Path, steps: int) -> list[str]:
    """A LastStepCheckpoint in ``dirpath`` every ``steps`` steps, kept, named by step, plus ``last``."""
    return [
        "--trainer.callbacks+=sa_train.callbacks.LastStepCheckpoint",
        f"--trainer.callbacks.dirpath={dirpath}",
        f"--trainer.callbacks.every_n_train_steps={steps}",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        "--trainer.callbacks.save_last=true",
    ]


def recording_losses(path: Path) -> list[str]:
    return ["--trainer.callbacks+=distributed_helpers.GlobalLossRecorder", f"--trainer.callbacks.path={path}"]


def stopping_at(step: int) -> list[str]:
    return ["--trainer.callbacks+=distributed_helpers.StopAtStep", f"--trainer.callbacks.step={step}"]


def quick(max_steps: int = STEPS) -> list[str]:
    return [
        f"--trainer.max_steps={max_steps}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_model_summary=false",
    ]


def fit_in_subprocess(config: Path, args: list[str], cwd: Path) -> str:
    """``python -m sa_train fit`` in a fresh process (Lightning starts the second rank itself); its stderr."""
    result = run_module(["fit", "--config", str(config), *args], cwd, DS_ACCELERATOR="cpu")
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def losses(path: Path) -> list[float]:
    return json.loads(path.read_text())


def assert_weights_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        difference = (actual[name].float() - tensor.float()).abs().max().item()
        assert difference <= atol, f"{name}: max difference {difference:.2e} > {atol:.0e}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_corpus):
    """The reference: one process, micro-batch 2 * MICRO_BATCH, STEPS steps; its losses and final weights."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    config = tiny_run_config(tmp_path, small_corpus)
    args = [
        *quick(),
        f"--data.batch_size={2 * MICRO_BATCH}",
        *recording_losses(tmp_path / "losses.json"),
        *checkpoints_every(tmp_path / "ckpt", STEPS),
    ]
    assert main(["fit", "--config", str(config), *args]) == 0
    return losses(tmp_path / "losses.json"), read_checkpoint(tmp_path / "ckpt" / "last.ckpt").state_dict


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_zero3_on_two_cpu_processes_resumes_and_matches_one_process(
    tmp_path, small_corpus, one_process
):
    """A ZeRO-3 run stopped at step 4 (mid-epoch) resumes from its step-4 folder; the two halves give the
    one-process curve and weights, and the folder consolidates. ZeRO-2, the shipped stage, is rehearsed as
    shipped (resume from ``last``, bitwise) in test_rehearsal.py, and its gradients are checked against one
    process below."""
    reference_losses, reference_weights = one_process
    config = tiny_run_config(tmp_path, small_corpus)
    ckpt = tmp_path / "ckpt"
    deepspeed = [
        "--trainer.devices=2",
        "--trainer.strategy=distributed_helpers.CPUDeepSpeedStrategy",
        "--trainer.strategy.stage=3",
        f"--data.batch_size={MICRO_BATCH}",
        *quick(),
        *checkpoints_every(ckpt, 4),
    ]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    fit_in_subprocess(config, [*deepspeed, *recording_losses(first), *stopping_at(4)], tmp_path)
    assert read_checkpoint(ckpt / "last.ckpt").global_step == 4
    resume = f"--ckpt_path={ckpt / 'step=4.ckpt'}"
    fit_in_subprocess(config, [*deepspeed, *recording_losses(second), resume], tmp_path)

    curve = losses(first) + losses(second)
    assert len(curve) == STEPS and curve[-1] < curve[0] - 0.3, curve
    assert curve == pytest.approx(reference_losses, abs=LOSS_TOL)
    final = ckpt / f"step={STEPS}.ckpt"
    assert final.is_dir(), "DeepSpeed writes checkpoint folders"
    assert_weights_close(read_checkpoint(final).state_dict, reference_weights, WEIGHT_TOL)

    single_file = tmp_path / "consolidated.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(final, single_file)
    model = SAModel.from_checkpoint(single_file)
    assert_weights_close(model.state_dict(), SAModel.from_checkpoint(final).state_dict(), 0)
    assert torch.isfinite(model(torch.randint(0, 512, (1, 8)))).all()

    (final / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete or damaged"):
        read_checkpoint(final)


def final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.slow
def test_ddp_resume_mid_epoch_is_bitwise_and_matches_one_process(
    tmp_path,
    small_corpus,
    one_process,
):
    """Two gloo ranks: resuming from a mid-epoch checkpoint ends with the uninterrupted run's exact weights;
    the uninterrupted run follows the one-process curve and counts the tokens of both ranks."""
    reference_losses, reference_weights = one_process
    config = tiny_run_config(tmp_path, small_corpus)
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", f"--data.batch_size={MICRO_BATCH}", *quick()]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    fit_in_subprocess(
        config, [*ddp, *checkpoints_every(full, 4), *recording_losses(full / "losses.json")], tmp_path
    )
    fit_in_subprocess(
        config,
        [
            *ddp,
            *checkpoints_every(resumed, 4),
            *recording_losses(resumed / "losses.json"),
            f"--ckpt_path={full / 'step=4.ckpt'}",
        ],
        tmp_path,
    )
    rows = csv.DictReader((tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv").open())
    tokens = [float(row["train/tokens"]) for row in rows if row.get("train/tokens")]
    assert tokens == [2 * MICRO_BATCH * 64 * step for step in range(1, STEPS + 1)]
    assert losses(resumed / "losses.json") == losses(full / "losses.json")[4:]
    assert_bitwise_equal(final_weights(resumed / "step=8.ckpt"), final_weights(full / "step=8.ckpt"))
    assert losses(full / "losses.json") == pytest.approx(reference_losses, abs=LOSS_TOL)
    assert_weights_close(read_checkpoint(full / "step=8.ckpt").state_dict, reference_weights, WEIGHT_TOL)


@pytest.mark.slow
def test_ddp_with_muon_and_an_sa_switch_matches_one_process(tmp_path, small_corpus):
    """model.optimizer=muon and model.sa_switch on two gloo ranks follow one process with the global batch.
    Muon orthogonalises the all-reduced gradient of each matrix, the same on every rank. At step 3 the first
    rank matches heads on its first row (the global batch's first sample: ranks are dealt samples round-robin)
    and every rank converts by its decision; DDP then wraps the SA model. (Saving and loading the optimizer
    state is the AdamW path's, resumed bitwise above; Muon's and the switch's resumes are tested in one
    process in test_sa_switch_run.py.)"""
    config = tiny_run_config(tmp_path, small_corpus, sa_groups="dense")
    switch = ["--model.sa_switch.at_step=3", "--model.sa_switch.groups=every:2", "--model.sa_switch.rows=1"]
    muon = ["--model.optimizer=muon", *switch, *quick()]
    one, two = tmp_path / "one", tmp_path / "two"
    single = [f"--data.batch_size={2 * MICRO_BATCH}", *checkpoints_every(one, STEPS)]
    assert main(["fit", "--config", str(config), *muon, *single, *recording_losses(one / "losses.json")]) == 0
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", f"--data.batch_size={MICRO_BATCH}"]
    fit_in_subprocess(
        config,
        [*muon, *ddp, *checkpoints_every(two, STEPS), *recording_losses(two / "losses.json")],
        tmp_path,
    )
    curve = losses(two / "losses.json")
    assert curve == pytest.approx(losses(one / "losses.json"), abs=LOSS_TOL)
    assert curve[-1] < curve[0] - 0.3, curve
    expected, actual = read_checkpoint(one / "last.ckpt"), read_checkpoint(two / "last.ckpt")
    assert actual.config.groups == expected.config.groups == [[0, 1], [2, 3]]
    assert_weights_close(actual.state_dict, expected.state_dict, MUON_WEIGHT_TOL)


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_accumulating_batches_has_the_gradients_of_one_process(tmp_path, small_corpus):
    """Two ranks, ZeRO-2, two micro-batches accumulated per step: the gradient norms DeepSpeed reports
    (before clipping) are those of one process on the same samples. Lightning and DeepSpeed each divided
    the loss by the accumulation, and every norm was half (while ``train/grad_norm`` read 0.0, from the
    ``p.grad`` that ZeRO leaves empty). Decoding speed is measured too: ZeRO-2 keeps whole weights on
    every rank (it was skipped under any DeepSpeed stage)."""
    config = tiny_run_config(tmp_path, small_corpus)
    accumulate = ["--trainer.accumulate_grad_batches=2", *quick(4)]
    assert main(["fit", "--config", str(config), *accumulate, f"--data.batch_size={2 * MICRO_BATCH}"]) == 0
    deepspeed = [
        "--trainer.devices=2",
        "--trainer.strategy=distributed_helpers.CPUDeepSpeedStrategy",
        "--trainer.strategy.stage=2",
    ]
    measured = ["--trainer.callbacks+=sa_train.callbacks.InferenceCost"]
    stderr = fit_in_subprocess(
        config, [*deepspeed, *accumulate, *measured, f"--data.batch_size={MICRO_BATCH}"], tmp_path
    )
    assert "sync_dist" not in stderr  # val/* are reduced already, cost/* measured on the first rank

    def column(version: int, key: str) -> list[float]:
        rows = csv.DictReader((tmp_path / "runs" / "tiny" / f"version_{version}" / "metrics.csv").open())
        return [float(row[key]) for row in rows if row.get(key)]

    one_process = column(0, "train/grad_norm")
    assert len(one_process) == 4 and min(one_process) > 0.1
    assert column(1, "train/grad_norm") == pytest.approx(one_process, rel=1e-4)
    (decode_rate,) = column(1, "cost/decode_tokens_per_sec")  # at the one validation, after the last step
    assert decode_rate > 0


@pytest.mark.slow
def test_resume_with_gradient_accumulation_from_last_and_mid_epoch_is_bitwise(
    tmp_path,
    small_corpus,
):
    """Accumulating 2 micro-batches per step: a run stopped after step 4 and resumed with ``--ckpt_path
    last``, and a run resumed from the uninterrupted run's step-4 checkpoint, end bitwise on its weights."""
    config = tiny_run_config(tmp_path, small_corpus)
    accumulate = ["--trainer.accumulate_grad_batches=2", *quick()]
    full, stopped, resumed = tmp_path / "full", tmp_path / "stopped", tmp_path / "resumed"

    def fit(*args: str) -> None:
        assert main(["fit", "--config", str(config), *accumulate, *args]) == 0

    fit(*checkpoints_every(full, 4), *recording_losses(full / "losses.json"))
    fit(*checkpoints_every(stopped, 4), *stopping_at(4))
    assert torch.load(stopped / "last.ckpt", weights_only=True)["global_step"] == 4
    fit(*checkpoints_every(stopped, 4), *recording_losses(stopped / "losses.json"), "--ckpt_path=last")
    fit(*checkpoints_every(resumed, 4), f"--ckpt_path={full / 'step=4.ckpt'}")

    expected = final_weights(full / "step=8.ckpt")
    assert_bitwise_equal(final_weights(stopped / "step=8.ckpt"), expected)
    assert_bitwise_equal(final_weights(resumed / "step=8.ckpt"), expected)
    # Two micro-batches per step, and the second half of the run sees the second half of the batches.
    assert len(losses(full / "losses.json")) == 2 * STEPS
    assert losses(stopped / "losses.json") == losses(full / "losses.json")[STEPS:]


@needs_deepspeed
@pytest.mark.parametrize(
    "strategy",
    [
        ["--trainer.strategy=deepspeed"],
        ["--trainer.strategy=lightning.pytorch.strategies.DeepSpeedStrategy", "--trainer.strategy.stage=3"],
    ],
)
def test_deepspeed_without_cuda_is_one_clear_error(
    tmp_path,
    small_corpus,
    capsys,
    strategy,
):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = tiny_run_config(tmp_path, small_corpus)
    assert main(["fit", "--config", str(config), *strategy]) == 2
    err = capsys.readouterr().err
    assert "trainer.strategy" in err and "only on CUDA GPUs" in err and "ddp" in err, err
    assert "Traceback" not in err


@needs_deepspeed
def test_deepspeed_optimizer_offload_is_one_clear_error(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    offload = [
        "--trainer.strategy=distributed_helpers.CPUDeepSpeedStrategy",
        "--trainer.strategy.offload_optimizer=true",
    ]
    assert main(["fit", "--config", str(config), *offload]) == 2
    err = capsys.readouterr().err
    assert "trainer.strategy.init_args.offload_optimizer=true" in err and "Traceback" not in err, err


@needs_deepspeed
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--model.optimizer=muon"], "model.optimizer=muon cannot run under trainer.strategy DeepSpeed"),
        (
            [
                "--model.config.sa_groups=dense",
                "--model.sa_switch.at_step=2",
                "--model.sa_switch.groups=every:2",
            ],
            "model.sa_switch cannot run under trainer.strategy CPUDeepSpeedStrategy",
        ),
    ],
)
def test_muon_or_an_sa_switch_under_deepspeed_is_one_clear_error(
    tmp_path, small_corpus, capsys, options, expected
):
    """ZeRO (any stage) steps the client optimizer on flat shards, which torch's Muon cannot orthogonalise;
    its engine holds the dense model's parameters for the whole run, which a switch replaces."""
    config = tiny_run_config(tmp_path, small_corpus)
    deepspeed = ["--trainer.strategy=distributed_helpers.CPUDeepSpeedStrategy", "--trainer.strategy.stage=1"]
    assert main(["fit", "--config", str(config), *deepspeed, *options]) == 2
    err = capsys.readouterr().err
    assert expected in err and "trainer.strategy=ddp" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").iterdir())


def test_unknown_strategy_name_is_one_clear_error(tmp_path, small_corpus, capsys):
    config = tiny_run_config(tmp_path, small_corpus)
    assert main(["fit", "--config", str(config), "--trainer.strategy=deepspeed_stage_9"]) == 2
    err = capsys.readouterr().err
    assert "error: trainer: You selected an invalid strategy name" in err and "Traceback" not in err, err


@needs_deepspeed
def test_cli_writes_atomically_except_under_deepspeed(tmp_path, small_corpus):
    """DeepSpeed saves its own folders and never calls a CheckpointIO; other strategies get the atomic one."""
    config = ["--config", str(tiny_run_config(tmp_path, small_corpus))]
    cpu_deepspeed = [
        "--trainer.strategy=distributed_helpers.CPUDeepSpeedStrategy",
        "--trainer.strategy.stage=1",
    ]
    deepspeed = SACLI([*config, *cpu_deepspeed], run=False)
    assert not isinstance(deepspeed.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert deepspeed.trainer.strategy.config["train_micro_batch_size_per_gpu"] == 8  # data.batch_size
    ddp = SACLI([*config, "--trainer.strategy=ddp", "--trainer.devices=2"], run=False)
    assert isinstance(ddp.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
