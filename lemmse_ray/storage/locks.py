"""Locks beside a group, so that processes sharing a folder create each group once and build each shard once.

Two studies given one ``--work`` (or two runs given one ``--bank``) may create the same bank or estimate
group at the same moment; creating a group empties its folder first, so without a lock one process deletes
what the other is half-way through writing.  A group at a local path ``…/name.zarr`` therefore has the lock
file ``…/name.zarr.lock`` beside it (not inside: creating the group empties its folder), and its locks are
POSIX record locks (``fcntl.lockf``) on bytes of that file:

* byte 0, the **creation lock** (:func:`creation_lock`): held while a process checks whether the group is there
  and whole, and reopens, creates or replaces it.  Held for a few metadata writes only, so a second process
  waits for the first to finish creating, then finds the group whole and reopens it;
* byte 1 + k, the lock of **shard k** of a bank (:func:`shard_lock`): held by the task that computes and
  writes that shard, which first checks whether another process finished it meanwhile.  Two processes
  building one bank thus share its shards instead of computing each twice;
* replacing a group (``overwrite``, or a half-made group) also takes bytes 1 … ∞ (:func:`wait_for_writers`):
  no shard is being written into a group while it is deleted.

The kernel releases a process's record locks when the process ends, however it ends (``kill -9``
included): a lock of a killed process is never stale, so no pid or age heuristic is needed, and none can
be fooled by a reused pid or a skewed clock.  On NFS the locks go through the lock manager (NFSv4, or lockd
for v3).  Every wait is bounded: after :data:`WAIT_S` seconds :class:`LockTimeout` names the lock file and
what it guards.  A file system without record locks (``ENOLCK``, ``EOPNOTSUPP``) runs unlocked, with one
warning.  Lock files are empty and stay in place: deleting one while another process waits on it would
give two processes "the" lock.  A process holds each lock file open once (record locks belong to the
process, and closing any descriptor of a file drops all of them), so the locks of one process do not
exclude each other's threads.

fsspec URLs (``s3://…``, ``gs://…``) have no lock: object stores offer no record lock.  There, each object is
written whole, so a shard written twice (same bytes) is never torn, but two processes creating one group at
the same moment can still leave it half-made; the next open recognises a half-made group (attributes
without all its arrays) and rebuilds it (:func:`lemmse_ray.storage.ownership.whole_group`).  Give two
processes one object-store group only one at a time.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("lemmse_ray")

WAIT_S = 600.0  # longest wait for a lock (read when waiting: a caller or a test may change it)
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.01, 0.5  # the pause between attempts doubles from the first to the longest
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
HELD = (errno.EACCES, errno.EAGAIN)


class LockTimeout(ValueError):
    """A lock not obtained within :data:`WAIT_S`.  A ``ValueError``, so that the command line reports it on one
    line; the message names the lock file and what holds it."""


def lock_path(url: str) -> str | None:
    """The lock file beside the group at ``url``, or None for a URL of a remote file system (no locks)."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        if protocol not in ("file", "local"):
            return None
        url = rest
    return os.path.abspath(url) + ".lock"


class _LockFile:
    """One open descriptor of a lock file in this process, shared by every lock this process holds in it."""

    def __init__(self, path: str):
        self.path = path
        self.users = 0
        self.writers_locked = False
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise ValueError(f"cannot open the lock file {path} beside the group: {err.strerror}") from None


_files: dict[str, _LockFile] = {}
_files_guard = threading.Lock()
_warned: set[str] = set()


@contextlib.contextmanager
def _file(path: str) -> Iterator[_LockFile]:
    with _files_guard:
        file = _files.get(path)
        if file is None:
            file = _files[path] = _LockFile(path)
        file.users += 1
    try:
        yield file
    finally:
        with _files_guard:
            file.users -= 1
            if not file.users:
                del _files[path]
                os.close(file.fd)


def _acquire(file: _LockFile, start: int, length: int, what: str) -> bool:
    """Lock bytes ``[start, start + length)`` (``length`` 0: to the end, and beyond) exclusively, waiting at
    most :data:`WAIT_S` seconds.  False (after one warning) where the file system has no record locks."""
    deadline = time.monotonic() + WAIT_S
    pause, told = FIRST_PAUSE_S, False
    while True:
        try:
            fcntl.lockf(file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
            return True
        except OSError as err:
            if err.errno in UNSUPPORTED:
                if file.path not in _warned:
                    _warned.add(file.path)
                    log.warning("%s: this file system has no record locks (%s); %s runs unlocked, so two "
                                "processes must not create or build it at once", file.path, err.strerror, what)
                return False
            if err.errno not in HELD:
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockTimeout(f"{what}: waited {WAIT_S:g} s for the lock {file.path}, held by another process; run "
                              "again once it has finished (a killed process holds no lock)")
        if not told and WAIT_S - left >= 1:
            log.info("%s: waiting for another process (lock %s)", what, file.path)
            told = True
        time.sleep(min(pause, left))
        pause = min(2 * pause, LONGEST_PAUSE_S)


def _release(file: _LockFile, start: int, length: int) -> None:
    fcntl.lockf(file.fd, fcntl.LOCK_UN, length, start)


@contextlib.contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Hold the creation lock of the group at ``url`` (byte 0 of its lock file): every check, reopening,
    creation or replacement of a group of this project runs under it.  Nothing for a remote URL."""
    path = lock_path(url)
    if path is None:
        yield
        return
    with _file(path) as file:
        locked = _acquire(file, 0, 1, f"creating or opening {url}")
        try:
            yield
        finally:
            if file.writers_locked:
                _release(file, 1, 0)
                file.writers_locked = False
            if locked:
                _release(file, 0, 1)


def wait_for_writers(url: str) -> None:
    """Under :func:`creation_lock`, before the group at ``url`` is deleted or replaced: wait until no process
    is writing a shard of it (bytes 1 … ∞), and keep them until the creation lock is released."""
    path = lock_path(url)
    if path is None:
        return
    with _files_guard:
        file = _files.get(path)
    if file is None:
        raise RuntimeError(f"wait_for_writers({url!r}) needs the creation lock of {url}")
    if not file.writers_locked:
        file.writers_locked = _acquire(file, 1, 0, f"replacing {url} (its shards are being written)")


@contextlib.contextmanager
def shard_lock(url: str, shard: int) -> Iterator[None]:
    """Hold the lock of shard ``shard`` of the bank at ``url`` (byte 1 + ``shard``) while it is computed and
    written: another process building the same bank waits for it, then finds it done.  Nothing for a remote
    URL."""
    path = lock_path(url)
    if path is None:
        yield
        return
    with _file(path) as file:
        locked = _acquire(file, 1 + shard, 1, f"shard {shard} of {url}")
        try:
            yield
        finally:
            if locked:
                _release(file, 1 + shard, 1)
