"""Run exports under ``transformers serve`` (the OpenAI API) on this machine, for tests and benchmarks.

Each folder gets its own server process on 127.0.0.1, offline (``HF_HUB_OFFLINE=1``), in a process group of
its own: the server spawns the process that holds the model, and killing the group stops both. All servers
start before any is waited for, since each spends most of its start (~15 s on a CPU core) importing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

# Continuous batching sizes its paged cache from the free memory unless told (14 GB of this CPU machine's
# RAM, filled with zeros at start): 16 blocks of 256 tokens are 4,096 cached tokens.
CONTINUOUS_BATCHING = ("--continuous-batching", "--cb-num-blocks", "16")


class ServerError(RuntimeError):
    """A server exited or did not answer /health in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict, timeout_s: float = 300) -> bytes:
    """POST ``body`` as JSON; the raw answer (a JSON document, or server-sent events when streaming)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


def _wait_until_ready(url: str, process: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"transformers serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise ServerError(f"transformers serve did not answer /health in time:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def served(
    folders: dict[str, tuple[Path, Sequence[str]]], log_dir: Path, timeout_s: float = 180
) -> Iterator[dict[str, str]]:
    """Serve each ``name: (folder, extra flags)``; yields each name's base URL once all answer /health."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started: dict[str, tuple[str, subprocess.Popen, Path]] = {}
    try:
        for name, (folder, flags) in folders.items():
            port = free_port()
            log = log_dir / f"serve-{name}.log"
            command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), *flags]
            command += ["--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)]
            with log.open("w") as sink:
                process = subprocess.Popen(
                    command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
            started[name] = (f"http://127.0.0.1:{port}", process, log)
        deadline = time.monotonic() + timeout_s
        for url, process, log in started.values():
            _wait_until_ready(url, process, log, deadline)
        yield {name: url for name, (url, _, _) in started.items()}
    finally:
        for _, process, _ in started.values():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
