"""Inductor's compile cache, kept usable when a compile was killed.

Inductor links each compiled graph straight to ``<cache>/<xx>/<key>.main.so`` under a per-key file lock
and, on later runs, loads any ``.so`` that exists. A process killed mid-link left a 0-byte or truncated
file there, and from then on every compile of that graph failed with ``ImportError: ... file too short``
(bench, ``generate --compile`` and ``compile: true`` runs alike) until the file was deleted by hand.
:func:`remove_broken_libraries` deletes such files before sa_train compiles; a file whose lock is held
belongs to a link in progress and is left alone.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from filelock import FileLock, Timeout

ELF_MAGIC = b"\x7fELF"


def inductor_cache_dir() -> Path:
    """Where Inductor keeps compiled code (``TORCHINDUCTOR_CACHE_DIR``, else its per-user temp folder)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def is_complete_library(path: Path) -> bool:
    """Whether ``path`` is a whole ELF file: its section headers, written last, end within the file."""
    with path.open("rb") as f:
        header = f.read(64)
    if len(header) < 64 or header[:4] != ELF_MAGIC:
        return False
    if header[4] != 2:  # not 64-bit: the magic is all that is checked
        return True
    order = "<" if header[5] == 1 else ">"
    (section_offset,) = struct.unpack_from(order + "Q", header, 0x28)
    entry_size, entries = struct.unpack_from(order + "HH", header, 0x3A)
    return path.stat().st_size >= section_offset + entry_size * entries


def remove_broken_libraries(cache: Path | None = None) -> list[Path]:
    """Delete the truncated ``.so`` files killed compiles left in Inductor's cache; returns them."""
    cache = inductor_cache_dir() if cache is None else cache
    if not cache.is_dir():
        return []
    removed = []
    for library in cache.glob("*/*.so"):
        if is_complete_library(library):
            continue
        lock = FileLock(cache / "locks" / f"{library.name.split('.')[0]}.lock")
        try:
            with lock.acquire(timeout=0):
                library.unlink(missing_ok=True)
                removed.append(library)
        except Timeout:  # a compile in progress holds it
            continue
    return removed
