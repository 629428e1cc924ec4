"""Child processes that do not outlive their parent, and a lock that gives one process a directory.

`unlearn serve` starts an embedded redis-server and a worker; both must stop however serve ends, and no
two redis-servers may ever append to one data dir's appendonly.aof."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen preexec_fn that has the kernel send `sig` to the child when its parent dies, or None off Linux.

    Cleanup in the parent (finally, atexit) cannot run when the parent is SIGKILLed or OOM-killed; only the
    kernel can still stop the children then, and prctl(PR_SET_PDEATHSIG) is how Linux offers it (it survives
    exec, so it works for a redis-server binary too). Other systems have no equivalent: there a SIGKILLed
    parent still orphans its children, and EmbeddedRedis shuts down the redis-server it finds at the next
    start. The signal fires when the *thread* that forked the child exits, so start children from the main
    thread. libc is resolved here, before the fork, so that the child only makes the one call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died between the fork and the prctl: nobody will signal us
            os.kill(os.getpid(), sig)

    return preexec


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; SIGKILL too when the wait itself is interrupted (a second
    Ctrl-C), so that the child is gone whichever way this returns or raises."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class LockHeld(Exception):
    """Another live process holds the lock; `holder` is the pid it wrote into the lock file."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def lock_exclusively(path: Path) -> IO[str]:
    """Hold an exclusive flock on `path` until the returned file is closed, with this pid written in it.

    flock rather than a pid file: the kernel releases it when the holder dies, however it dies, so a lock
    left by a crashed process never blocks a restart and a recycled pid never passes for a live holder. The
    file is opened close-on-exec (PEP 446), so children do not inherit, and so do not prolong, the lock.
    The file is never deleted: unlinking it would let two processes lock two different inodes."""
    file = path.open("a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise LockHeld(holder) from None
    file.truncate(0)
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file
