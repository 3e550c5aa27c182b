"""Files that survive a crash: atomic writes (temporary file in the same folder, fsync, rename),
cache locks and JSON-lines logs. The ground floor: imports nothing of semfl."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable



def _file_mode() -> int:
    """The permissions open() gives a new file: 0o666 less the process's umask (read, then restored)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; the renamed file gets what a plain open() would have given
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def cache_lock(path: Path):
    """Hold an exclusive lock beside a cache file while checking and filling it, so parallel runs
    (sweep --jobs, Flower nodes on one host) train a cached model once instead of racing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


@contextmanager
def folder_lock(folder: Path, what: str = "folder"):
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file in it, holding the owner's pid) while
    writing into it; a second process that asks for it gets :class:`FolderBusy` at once, naming the
    owner, instead of interleaving its writes (two `semfl verify` or `sweep` commands given the same
    runs, say). The lock goes with the process: a killed run leaves no stale lock behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise FolderBusy(f"{folder}: this {what} is in use by another process (pid {owner}); "
                             f"wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


CHECKOUT = Path(__file__).resolve().parents[2]  # src/semfl/files.py -> the checkout (when semfl runs from one)


def checkout_root(needs: str = "configs") -> Path:
    """The repository checkout semfl was imported from (the folder holding ``configs/`` and
    ``benchmarks/``), for commands that read its files wherever they are started; FileNotFoundError
    naming ``needs`` (the path it must hold) when semfl runs from an installed copy."""
    if not (CHECKOUT / needs).exists():
        raise FileNotFoundError(f"{needs}: not found beside this semfl ({CHECKOUT}); this command needs a checkout of "
                                "the repository (git clone, then pip install -e .)")
    return CHECKOUT


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda h: h.write(text), mode="w")


class DamagedFile(ValueError):
    """A JSON-lines file damaged other than by a crash during its last append: reading on would
    lose or misread rows, so the caller stops and names the file and line."""


def read_jsonl(path: Path) -> list[dict]:
    """The rows (JSON objects, one per line) of ``path``; [] when there is no file. A last line
    torn by a crash mid-append is left out; any other line that is not a JSON object raises
    :class:`DamagedFile` naming it (rows after it would otherwise be silently dropped)."""
    if not Path(path).is_file():
        return []
    lines = [(number, line) for number, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
            if index == len(lines) - 1:
                break  # a line torn by a crash while it was appended: the valid part ends here
        if not isinstance(row, dict):
            raise DamagedFile(f"{path}: line {number} is not a JSON object ({line[:40]!r}); the file is damaged: "
                              "restore it from a copy, or rerun into a new folder")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_text(path, "".join(json.dumps(r) + "\n" for r in rows))
