"""Test-only: a real Slurm cluster on this host (Debian's slurmctld, slurmd, munge), started and stopped here.

Two simulated nodes ``n1`` and ``n2`` run as two slurmd processes on localhost, each with its own port; the
controller, the node daemons and munged keep their sockets, pid files, state and logs in one folder, so a
cluster touches nothing under /etc and two of them (e.g. two pytest-xdist workers) can run side by side.
Measured on a 2-core Debian machine: the daemons are up and the nodes idle in ~1 s; a job that trains the
tiny test model for a few steps takes ~15-40 s, most of it Python start-up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
MUNGE_USER = "munge"


def missing_tools() -> list[str]:
    """What this host lacks to run a local cluster (empty when it can)."""
    missing = [name for name in TOOLS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if os.geteuid() != 0:
        missing.append("root (the daemons run as root and munge)")
    if not Path("/etc/munge/munge.key").is_file():
        missing.append("/etc/munge/munge.key")
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """Start with :meth:`start`, submit with :meth:`sbatch`, and always :meth:`stop` (kills by pid file)."""

    def __init__(self, folder: Path, nodes: int = 2, cpus_per_node: int = 2) -> None:
        self.folder = folder
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # munged insists that every folder above its socket be searchable by all and owned by it or root.
        self.folder.chmod(0o755)
        munge = self.folder / "munge"
        munge.mkdir(exist_ok=True)
        shutil.chown(munge, MUNGE_USER, MUNGE_USER)
        self.socket = munge / "munge.socket"
        self.run(
            "runuser", "-u", MUNGE_USER, "--", _daemon("munged"),
            f"--socket={self.socket}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}",
        )  # fmt: skip
        self.pid_files.append(munge / "munged.pid")
        self.conf.write_text(self._config())
        for folder in ("state", *(f"spool/{node}" for node in self.nodes)):
            (self.folder / folder).mkdir(parents=True, exist_ok=True)
        self.run(_daemon("slurmctld"), "-i")
        self.pid_files.append(self.folder / "slurmctld.pid")
        for node in self.nodes:
            self.run(_daemon("slurmd"), "-N", node)
            self.pid_files.append(self.folder / f"slurmd-{node}.pid")
        self.wait_until(lambda: self._idle_nodes() == len(self.nodes), 60, "nodes to become idle")

    def _config(self) -> str:
        host = socket.gethostname().split(".")[0]
        ports = [free_port() for _ in range(len(self.nodes) + 1)]
        f = self.folder
        return "\n".join(
            [
                f"ClusterName=sa{os.getpid()}",
                f"SlurmctldHost={host}(127.0.0.1)",
                f"SlurmctldPort={ports[0]}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CryptoType=crypto/munge",
                f"AuthInfo=socket={self.socket}",
                "MpiDefault=none",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SwitchType=switch/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "MailProg=/bin/true",
                # Simulated nodes may claim more CPUs than the host has; a requeued job is killed 2 s after
                # its SIGTERM instead of the default 30 s.
                "SlurmdParameters=config_overrides",
                "KillWait=2",
                f"StateSaveLocation={f / 'state'}",
                f"SlurmdSpoolDir={f / 'spool' / '%n'}",
                f"SlurmctldPidFile={f / 'slurmctld.pid'}",
                f"SlurmdPidFile={f / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={f / 'slurmctld.log'}",
                f"SlurmdLogFile={f / 'slurmd-%n.log'}",
                *(
                    f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                    f"CPUs={self.cpus_per_node} RealMemory=8000"
                    for node, port in zip(self.nodes, ports[1:], strict=True)
                ),
                f"PartitionName=local Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this cluster started, by their pid files: the Slurm
        daemons together, munged (which they authenticate with) after them."""
        if not self.pid_files:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("scancel", "--full", "--user=root", check=False)
        munged, *slurm = self.pid_files
        for group in (slurm, [munged]):
            pids = [int(f.read_text().split()[0]) for f in group if f.is_file()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self.wait_until(lambda pids=pids: not any(map(_alive, pids)), 30, "the daemons to stop")

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit a batch script; returns the job id."""
        result = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})})
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        info: dict[str, str] = {}

        def reached() -> bool:
            info.update(self.job(job_id))
            return info.get("JobState") in states

        self.wait_until(reached, timeout, f"job {job_id} to reach {sorted(states)}")
        return info

    def _idle_nodes(self) -> int:
        out = self.run("sinfo", "--noheader", "--format=%T %D", check=False).stdout
        return sum(
            int(count) for state, count in (line.split() for line in out.splitlines()) if state == "idle"
        )

    def run(self, *command: str, env: dict[str, str] | None = None, check: bool = True):
        result = subprocess.run(command, env=env or self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{self.logs()}"
            )
        return result

    def wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}.{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        tails = []
        for log in sorted(self.folder.glob("*.log")):
            tails.append(
                f"\n--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            )
        return "".join(tails)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
