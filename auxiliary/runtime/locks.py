"""One writer per folder: `FolderLock(path)` holds `<path>/.lock` (the holder's PID and host).

    with FolderLock(output_dir):
        train(...)

A second holder is refused with a one-line error naming the first while the first's PID is
alive on this host (or whenever the lock comes from another host, whose processes cannot be
checked). A lock left by a dead process is taken over with a warning. Creation uses O_EXCL, so
two processes starting at once never both get it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from auxiliary.runtime.io_utils import PRIVATE_FILE_MODE, private_dir

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# a lock file with no readable holder yet may belong to a process between create and write
UNWRITTEN_GRACE_SECONDS = 2.0


class FolderLockError(RuntimeError):
    """The folder is held by another live process; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(lock_file: Path) -> dict | None:
    try:
        holder = json.loads(lock_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder


class FolderLock:
    def __init__(self, path: str | os.PathLike):
        self.folder = Path(path)
        self.lock_file = self.folder / LOCK_NAME
        self.holder = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def acquire(self) -> "FolderLock":
        if self.held:
            raise FolderLockError(f"{self.folder} is already locked by this FolderLock")
        private_dir(self.folder, tighten_existing=False)  # the lock never changes the mode of a user's folder
        payload = json.dumps({**self.holder, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
        while True:
            try:
                fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return self

    def _take_over_if_stale(self) -> None:
        """Raise if the lock's holder may be alive; else move the stale lock aside (caller retries)."""
        holder = _read_holder(self.lock_file)
        if holder is None:
            try:
                age = time.time() - self.lock_file.stat().st_mtime
            except FileNotFoundError:
                return  # released meanwhile
            if age < UNWRITTEN_GRACE_SECONDS:
                time.sleep(0.1)  # its creator is probably writing it right now
                return
            reason = "unreadable"
        else:
            host, pid = holder.get("host"), holder["pid"]
            if host != self.holder["host"]:
                raise FolderLockError(f"{self.folder} is in use by PID {pid} on host {host} "
                                      f"(lock {self.lock_file}; delete it if that process is gone)")
            if _pid_alive(pid):
                raise FolderLockError(f"{self.folder} is in use by PID {pid} on {host} since "
                                      f"{holder.get('since', '?')} (lock {self.lock_file})")
            reason = f"PID {pid} on {host} is gone"
        # Rename (atomic) rather than delete, then check we moved the lock we judged stale: a
        # process that took it over between our read and our rename must keep its lock.
        aside = self.lock_file.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.lock_file, aside)
        except FileNotFoundError:
            return
        if _read_holder(aside) != holder:
            try:
                os.link(aside, self.lock_file)  # put the live lock back (fails if yet another appeared)
            except FileExistsError:
                pass
            os.unlink(aside)
            return
        os.unlink(aside)
        logger.warning("%s: taking over a stale lock (%s)", self.folder, reason)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read_holder(self.lock_file)
        if holder is not None and holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
            os.unlink(self.lock_file)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
