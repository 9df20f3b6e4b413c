"""A compile killed mid-link leaves a truncated library in Inductor's cache: the next must not load it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from filelock import FileLock

from sa_train.compile_cache import is_complete_library, remove_broken_libraries

ROOT = Path(__file__).resolve().parents[2]


def _a_real_library() -> Path:
    return next(Path(torch.__file__).parent.glob("lib/libc10.so"))


def test_truncated_libraries_are_removed_unless_a_compile_holds_their_lock(tmp_path: Path) -> None:
    folder = tmp_path / "ab"
    folder.mkdir()
    whole = folder / "cwhole.main.so"
    shutil.copyfile(_a_real_library(), whole)
    empty = folder / "cempty.main.so"  # the kill came before the linker wrote anything
    empty.write_bytes(b"")
    truncated = folder / "ctrunc.main.so"  # ... or halfway through
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    linking = folder / "clinking.main.so"  # a link in progress in another process
    linking.write_bytes(b"")
    (tmp_path / "locks").mkdir()
    assert is_complete_library(whole) and not is_complete_library(truncated)
    with FileLock(tmp_path / "locks" / "clinking.lock"):
        removed = remove_broken_libraries(tmp_path)
    assert sorted(removed) == sorted([empty, truncated])
    assert sorted(p.name for p in folder.iterdir()) == ["clinking.main.so", "cwhole.main.so"]


# A fresh process compiling one small function (Inductor's in-memory caches empty), after the sweep or not.
COMPILE = """
import sys, torch
from sa_train.compile_cache import remove_broken_libraries
if sys.argv[1] == "sweep":
    remove_broken_libraries()
print(torch.compile(lambda x: (x * 2).sin() + 1)(torch.arange(4.0)).tolist())
"""


def test_a_compile_after_a_killed_one_works(tmp_path: Path) -> None:
    """The poisoning as a user met it: the compiled library left at 0 bytes, then the same graph compiled."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def compile_in_a_process(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", COMPILE, mode], env=env, capture_output=True, text=True, timeout=600
        )

    first = compile_in_a_process("plain")
    assert first.returncode == 0, first.stderr[-2000:]
    for library in tmp_path.glob("*/*.so"):
        library.write_bytes(b"")  # what a kill mid-link leaves
    poisoned = compile_in_a_process("plain")
    # Without the sweep the compile fails: here on the truncated ISA-probe library, as a C++ compile error.
    assert poisoned.returncode != 0
    recovered = compile_in_a_process("sweep")
    assert recovered.returncode == 0 and recovered.stdout == first.stdout, recovered.stderr[-2000:]
