"""Files written so that a kill at any instant leaves the old file or the new one, never half of either.

A writer stages its file (or folder) beside the target under a hidden name that says who writes it
(:func:`writer_path`), then renames it over the target; :func:`remove_stale_temp_files` deletes what a
killed writer left, and only that; a full disk is reported as one clear error naming the space needed.
Checkpoints (:mod:`sa_train.checkpoint_io`), ``convert`` and ``export`` write through here.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sa_train.errors import DiskFullError

# What a writer stages beside its target: hidden, named by the writing process (pid and host) and a kind
# (``tmp``: a file or folder being written; ``old``: an export moved aside during its swap). The host tells
# a dead writer from a live one on another node sharing the filesystem: a pid means nothing elsewhere.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"
_WRITER_NAME = re.compile(
    r"^\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)$"
)
# Names of earlier versions: checkpoint temp files by pid alone (always written on this host), and
# ``tempfile`` names (checkpoints: mkstemp; export: its staging and moved-aside folders), which no writer
# of this version makes, so they are leftovers by construction.
_PID_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_LEGACY_FILE = re.compile(r"^\..+\.ckpt\.[a-z0-9_]{8}\.tmp$")
_LEGACY_FOLDERS = (re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\..+\.old\.[a-z0-9_]{8}$"))
# A leftover of a writer on another host is stale once untouched this long: a live writer keeps writing
# until it renames its file, and no checkpoint or export write pauses for an hour.
FOREIGN_STALE_SECONDS = 3600


def writer_path(target: Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``target`` for this process to write (or move aside) ``target`` through."""
    return target.parent / f".{target.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}.{kind}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _is_leftover(entry: Path) -> bool:
    """Whether ``entry`` is what a writer that no longer runs left behind (never a live writer's)."""
    name = entry.name
    if match := _WRITER_NAME.match(name):
        if match["host"] == _HOST:
            return not _process_alive(int(match["pid"]))
        try:
            return time.time() - entry.lstat().st_mtime > FOREIGN_STALE_SECONDS
        except FileNotFoundError:
            return False
    if match := _PID_TEMP_NAME.match(name):
        return not _process_alive(int(match["pid"]))
    if entry.is_dir():
        return any(pattern.match(name) for pattern in _LEGACY_FOLDERS)
    return bool(_LEGACY_FILE.match(name))


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete what killed writers left in ``folder`` (temp files, export staging and moved-aside folders);
    returns what was removed.

    Only entries named like :func:`writer_path`'s whose writer is gone are touched (its pid is dead on this
    host, or, written from another host, untouched for :data:`FOREIGN_STALE_SECONDS`), so a write in
    progress in another process is left alone; entries named the way earlier versions named them are
    leftovers by construction and go too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") and _is_leftover(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def warn_removed(paths: list[Path]) -> None:
    """Tell the user what :func:`remove_stale_temp_files` removed, one warning per entry."""
    for path in paths:
        warnings.warn(f"Removed {path}, left by a checkpoint write that was killed.", stacklevel=3)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename: readers see the old or the new file.

    The temp file is created with mode 0o666 less the umask, like any file the run writes (``mkstemp``'s
    0600 would hide checkpoints from the run owner's group), and temp files that killed writers left
    beside ``path`` are removed first, so a crash mid-save costs disk space only until the next save. A
    full disk raises :class:`DiskFullError` (the previous ``path`` intact, no temp file left).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    tmp = writer_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error, path.parent, tensor_bytes(obj)):
            raise disk_full_error(path, tensor_bytes(obj), "checkpoint") from error
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples: about the size of its saved file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def is_disk_full(error: BaseException, folder: Path, needed: int) -> bool:
    """Whether a write failed for lack of space: an OSError (ENOSPC, EDQUOT) anywhere in the error's chain or
    named in its text (safetensors reports "No space left on device (os error 28)"), or torch's zip writer's
    RuntimeError ("unexpected pos": it swallows the OSError) while less than ``needed`` bytes are free."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        return shutil.disk_usage(folder).free < needed
    return False


def _size(n: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def disk_full_error(target: Path, needed: int, what: str) -> DiskFullError:
    """The message of a write of ``target`` (a ``what``) that ran out of space, with the space involved."""
    free = shutil.disk_usage(target.parent).free
    return DiskFullError(
        f"cannot write the {what} {target}: the disk holding {target.parent} is full ({_size(free)} free, "
        f"the {what} needs about {_size(needed)}); nothing partial was left, and what {target.parent.name}/ "
        "held before is intact. Free space on that "
        "disk (e.g. delete old runs or exports), or write to a disk with room (trainer.default_root_dir for "
        "fit, --out for export and convert); fit resumes with --ckpt_path <run>/checkpoints/last.ckpt."
    )


def atomic_hardlink(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make ``target`` a hard link of ``source`` through a temp name, so ``target`` is never absent."""
    target = Path(target)
    tmp = writer_path(target)
    os.link(source, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
