"""One run per workdir at a time: an advisory lock on ``<workdir>/.lock``.

Two runs writing one workdir would race on its checkpoints and results. The lock is an OS file
lock (flock), so it is released when the holding process ends in any way, kill -9 included; the
file's text names the holder for the message a second run prints. Only process 0 of a
multi-process run takes it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
from collections.abc import Iterator

import jax

from synseg_jax import paths

LOCK_NAME = ".lock"


class WorkdirBusyError(FileExistsError):
    """Another run holds the workdir."""


@contextlib.contextmanager
def exclusive(workdir: str, wait: bool = False) -> Iterator[None]:
    """Holds the workdir's lock for the block. Taken: WorkdirBusyError naming the holder, or with
    `wait` (a shared, one-time product such as the demo's pretrained backbone) wait for it."""
    if jax.process_index() != 0:
        yield
        return
    if paths.is_url(workdir):
        # Object stores (gs://) have no file locks; such a workdir is not guarded.
        logging.info("%s is not locked against a second run: no file locks on %s", workdir,
                     workdir.split("://", 1)[0] + "://")
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            if wait:
                print(f"Waiting for {workdir}, in use by {holder}", flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:
                raise WorkdirBusyError(
                    f"Workdir {workdir} is in use by another run ({holder}); wait for it to "
                    f"end, or give this run another --workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
