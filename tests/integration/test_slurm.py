"""The project's sbatch templates (scripts/slurm/) on a real Slurm: two CPU tasks on one node, one task on
each of two nodes, and a SIGUSR1 that makes a job checkpoint, requeue itself and finish from the checkpoint.

The cluster (tests/local_slurm.py) runs on this host; the tests skip where Slurm or munge is not installed
(.ci/run installs both). The templates ask for GPUs; the submissions here override that with
``--gres=none --cpus-per-task=1`` and add ``--trainer.accelerator=cpu`` to the fit options.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from local_slurm import LocalSlurm, free_port, missing_tools
from test_cli import tiny_run_config

from sa_train.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_tools()), reason=f"no local Slurm: missing {', '.join(missing_tools())}"),
]

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "scripts" / "slurm"
JOB_TIMEOUT = 300
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def slurm():
    # Not under pytest's tmp_path: munged refuses a socket below a folder that others cannot search.
    folder = Path(tempfile.mkdtemp(prefix="sa-slurm-"))
    cluster = LocalSlurm(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def submit(slurm: LocalSlurm, tmp_path: Path, corpus: Path, template: str, sbatch: list[str], fit: list[str]):
    """Submit a template with a tiny CPU config; returns the job id and the run's folders."""
    config = tiny_run_config(tmp_path, corpus)
    # As docs/distributed.md says: tokenise once before a job, or the first task of every node would do it
    # (Lightning's prepare_data runs per node), all into the one shared cache at the same time.
    assert main(["prepare", "--config", str(config)]) == 0
    run = tmp_path / "run"
    env = {
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        # The simulated node names (n1, n2) do not resolve; both nodes are this host. Lightning's port for
        # Slurm jobs comes from the job id, which another test cluster on this host may share.
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    job_id = slurm.sbatch(
        "--gres=none",
        "--cpus-per-task=1",
        "--time=10",
        f"--chdir={tmp_path}",
        f"--output={tmp_path / 'job-%j.out'}",
        *sbatch,
        str(TEMPLATES / template),
        str(config),
        "--trainer.accelerator=cpu",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        "--trainer.callbacks+=distributed_helpers.ClusterReport",
        f"--trainer.callbacks.folder={run / 'report'}",
        "--trainer.callbacks+=sa_train.callbacks.LastStepCheckpoint",
        f"--trainer.callbacks.dirpath={run / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        *fit,
        env=env,
    )
    return job_id, run


def job_output(tmp_path: Path, job_id: str) -> str:
    return (tmp_path / f"job-{job_id}.out").read_text(errors="replace")


def reports(run: Path, restart: int = 0) -> list[dict]:
    paths = sorted((run / "report").glob(f"restart{restart}-*.json"))
    return [json.loads(path.read_text()) for path in paths]


def test_slurm_two_nodes_one_task_each(slurm, tmp_path, small_corpus):
    job_id, run = submit(
        slurm,
        tmp_path,
        small_corpus,
        "multi-node.sbatch",
        ["--nodes=2", "--ntasks-per-node=1"],
        ["--trainer.max_steps=3"],
    )
    info = slurm.wait_for_state(job_id, ENDED, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED", job_output(tmp_path, job_id)[-4000:]
    seen = reports(run)
    assert all(r["environment"] == "SLURMEnvironment" and r["world_size"] == 2 for r in seen), seen
    assert [(r["global_rank"], r["node_rank"], r["num_nodes"]) for r in seen] == [(0, 0, 2), (1, 1, 2)]
    assert {r["slurm_node"] for r in seen} == {"n1", "n2"}
    assert torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_slurm_single_node_two_tasks_checkpoints_requeues_and_resumes_on_sigusr1(
    slurm,
    tmp_path,
    small_corpus,
):
    """Two tasks on one node; SIGUSR1 after step 3 of 6 (as 90 s before the time limit): Lightning saves
    hpc_ckpt_1.ckpt and requeues the job, whose second run restores it and completes."""
    marker = tmp_path / "paused"
    job_id, run = submit(
        slurm,
        tmp_path,
        small_corpus,
        "single-node.sbatch",
        ["--ntasks-per-node=2"],
        [
            "--trainer.max_steps=6",
            "--trainer.callbacks+=distributed_helpers.PauseForPreemption",
            "--trainer.callbacks.step=3",
            f"--trainer.callbacks.marker={marker}",
        ],
    )
    paused = [Path(f"{marker}.{rank}") for rank in (0, 1)]
    slurm.wait_until(lambda: all(p.exists() for p in paused), JOB_TIMEOUT, "both ranks to pause at step 3")
    first = reports(run, restart=0)
    assert [(r["global_rank"], r["world_size"], r["num_nodes"]) for r in first] == [(0, 2, 1), (1, 2, 1)]
    assert all(r["environment"] == "SLURMEnvironment" for r in first), first
    assert len({r["slurm_node"] for r in first}) == 1
    slurm.run("scancel", "--signal=USR1", job_id)
    # Lightning saves hpc_ckpt_1.ckpt and runs `scontrol requeue`; Slurm holds a requeued job for a while
    # (reason BeginTime), so release it at once.
    slurm.wait_for_state(job_id, {"PENDING"}, JOB_TIMEOUT)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    info = slurm.wait_for_state(job_id, ENDED, JOB_TIMEOUT)
    output = job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output[-4000:]

    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert "restart 0" in output and "restart 1" in output
    assert "Restored all states from the checkpoint" in output
    second = reports(run, restart=1)
    assert [(r["global_rank"], r["world_size"], r["environment"]) for r in second] == [
        (0, 2, "SLURMEnvironment"),
        (1, 2, "SLURMEnvironment"),
    ]
    assert torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6
