"""Writing without half-written results: every file and directory vlmtune produces is built under a temporary
name beside its target and renamed into place, so a crash at any moment leaves the old version or the new one,
never a mix or nothing.

- `write_file` / `write_text`: one file
- `write_into`: several files into a directory that holds others (an adapter into its run directory)
- `replace_dir`: a whole directory (a checkpoint, a merged model, a dataset), with no moment without one
- `temporary` names what is being written (machine and process), so `remove_abandoned` can clear what a dead
  writer left without touching a write in progress
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def temporary(path: Path) -> Path:
    """Where `path` is written before it is complete: beside it (same file system, so the rename is atomic),
    named by the machine and process writing it."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_file(path: Path, write: Callable[[IO[Any]], None], binary: bool = True) -> None:
    """`write(f)` into a temporary file, then renamed to `path` (readable by all who can read its directory)."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda f: f.write(text), binary=False)


def write_into(directory: Path, write: Callable[[Path], None], last: str = "adapter_config.json") -> None:
    """Call `write(tmp_dir)`, then move each file it wrote into `directory`, the file named `last` at the end.

    For a directory that also holds other things (a run directory: logs, checkpoints): each file is either its
    old or its new version at any moment, and `last` (the adapter config) marks the whole as in place.
    """
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".saving-"))
    try:
        write(tmp)
        for f in sorted(tmp.rglob("*"), key=lambda p: p.name == last):
            if f.is_file():
                dest = directory / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory `new` at `target`, with no moment at which `target` holds no complete
    version: a first one is renamed in; an existing one is swapped with it in one atomic step
    (`renameat2(RENAME_EXCHANGE)`, Linux), then removed. Where that call is missing, the old version is
    renamed aside first, so the gap is two renames long, and the old one stays beside the target if the
    second fails."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # now the old version
        return
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def build_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """`build(tmp_dir)` under a temporary name beside `target`, then `replace_dir` onto it."""
    tmp = temporary(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_abandoned(directory: Path) -> None:
    """Temporaries in `directory` whose writer on this machine is gone (a run killed mid-write): nothing would
    ever read or finish them. Other machines' temporaries are left alone: their writers cannot be asked."""
    host = socket.gethostname()
    for tmp in directory.glob("*.tmp"):
        stem, pid, _ = ("", "", "", *tmp.name.rsplit(".", 2))[-3:]
        if stem.endswith(f".{host}") and pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0
