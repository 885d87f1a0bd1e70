"""Claims on shared folders of an output root, so concurrent runs into one root cooperate.

A stage folder is built by one run at a time: a second run that needs it waits and then takes it
from the cache, or (asked not to wait) fails naming the run that holds it. The locks are `flock`
locks (the `filelock` package), which the kernel releases when the holder dies, even by `kill -9`;
the holder's description beside the lock is informational only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from dgpt_core.cli_errors import DgptError


class StageBusyError(DgptError):
    """The stage folder is being built by another run and the caller asked not to wait."""


def _holder_file(lock_path: Path) -> Path:
    """Where the holder of the lock at `lock_path` describes itself."""
    return lock_path.with_name(lock_path.name + ".holder")


def holder_description(path: Path) -> str:
    """Who holds the lock at `path`, as its holder described itself ("unknown run" if unreadable)."""
    try:
        holder = json.loads(_holder_file(path).read_text())
    except (OSError, ValueError):
        return "an unknown run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"run {holder.get('run')!r} (pid {holder.get('pid')} on {holder.get('host')}, since {since})"


@contextlib.contextmanager
def claim(path: Path, what: str, run_name: str, wait: bool = True) -> Iterator[None]:
    """Hold the lock file `path` while the block runs. `wait=False` raises StageBusyError at once
    when another process holds it; otherwise this waits, saying once who it waits for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = holder_description(path)
        if not wait:
            raise StageBusyError(f"{what} is being built by {holder}",
                                 hint="run again without --no-wait to wait for it and use its result") from None
        print(f"{what}: waiting for {holder}")
        lock.acquire()
    holder_file = _holder_file(path)
    try:
        holder_file.write_text(json.dumps({"run": run_name, "pid": os.getpid(), "host": socket.gethostname(),
                                           "since": time.time()}))
        yield
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()
