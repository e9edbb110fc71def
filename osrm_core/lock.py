"""One writer at a time per run (or study) directory.

A writer holds an exclusive ``fcntl.flock`` on ``<dir>/.osrm.lock``, a file that records who
holds it: process id, host, start time and command. The kernel drops the lock when its holder
exits or is killed, so a lock left by a killed process is free for the next writer at once,
and two writers that try at the same moment cannot both get it (the kernel grants it to one).
The file itself stays (deleting it would let a third writer lock a new file while another
still holds the old one); its record of a dead holder is simply overwritten.

Readers (the app's pages, ``osrm show``) never take the lock and never wait. The lock is held
per thread: two sessions of one Streamlit server are two writers, while a thread that already
holds the lock of a directory may take it again (nested calls of the library).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from osrm_core.errors import LockedError

#: Name of the lock file inside a locked directory (left out of zips and checks).
LOCK_NAME = ".osrm.lock"



_registry_guard = threading.Lock()
#: Locks this process holds: resolved directory -> [thread id, file descriptor, depth].
_held: dict[str, list[int]] = {}


def _holder_record() -> dict:
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": command[:200],
        "thread": threading.current_thread().name,
    }


def read_holder(path: str | Path) -> dict | None:
    """The record in ``path``'s lock file (pid, host, started, command), or None when it holds
    none. It may name a process that has died since: only a writer knows whether the lock is
    held, by trying to take it."""
    try:
        text = (Path(path) / LOCK_NAME).read_text(encoding="utf-8")
        record = json.loads(text) if text.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _describe(path: Path, holder: dict | None) -> str:
    where = f"{str(path)!r} is being written by another "
    if holder is None:
        who = "process (it is recording its details right now)"
    else:
        same = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
        who = (
            ("session of this app" if same else "process")
            + f": process {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("command") else "")
        )
    return (
        f"{where}{who}; wait until it finishes, or, if that process no longer runs, "
        f"delete {str(path / LOCK_NAME)!r}"
    )


class DirLock:
    """The exclusive lock of one directory: ``with DirLock(path): ...`` or
    :meth:`acquire`/:meth:`release`. :class:`LockedError` when another writer holds it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _key(self) -> str:
        return str(self.path.resolve())

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        key, me = self._key(), threading.get_ident()
        with _registry_guard:
            entry = _held.get(key)
            if entry is not None and entry[0] == me:
                entry[2] += 1
                return
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = None
            for _ in range(20):  # a holder that has just taken the lock writes its record next
                holder = read_holder(self.path)
                if holder is not None:
                    break
                time.sleep(0.05)
            raise LockedError(_describe(self.path, holder)) from None
        record = json.dumps(_holder_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        with _registry_guard:
            _held[key] = [me, fd, 1]

    def release(self) -> None:
        key = self._key()
        with _registry_guard:
            entry = _held.get(key)
            if entry is None or entry[0] != threading.get_ident():
                raise RuntimeError(f"{str(self.path)!r} is not locked by this thread")
            entry[2] -= 1
            if entry[2] > 0:
                return
            del _held[key]
        fd = entry[1]
        try:
            os.ftruncate(fd, 0)  # no record: nobody holds it
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
