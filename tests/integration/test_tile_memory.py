"""The tuned bf16 kernel tiles still fit an H200, by Triton's own compiler (for sm_90, on this CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tuned_bf16_tiles_fit_an_h200() -> None:
    """Every kernel variant of a group's forward, backward and decode, compiled for sm_90: the first
    configuration of each tile list (what the kernels were timed with) needs no more than the H200's
    232448 bytes of shared memory. A kernel change that makes one need more fails here, not as a silent
    fall-back to slower tiles on the GPU. (fp32 too: ``python scripts/tile_memory.py``, about 2 min.)
    The delta pre-pass, sized by head size, spills no registers (ptxas's report)."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "scripts/tile_memory.py",
            "--check",
            "--registers",
            "--dtypes",
            "bfloat16",
            "--head-dims",
            "64",
            "128",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("bfloat16")]
    assert len(table) == 2 * 7  # forward x2, delta x2, backward x2 (anchor, shared), decode per head size
    assert all(" * " in line for line in table)  # each list's first tiles fit
    deltas = [line for line in table if " delta " in line]
    assert len(deltas) == 4 and all(" 0 B spilled" in line for line in deltas)  # tiles sized by head_dim
