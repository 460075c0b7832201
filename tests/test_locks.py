"""One run per workdir: a second run is refused with the holder named; the lock dies with its
holder, however it ends."""

import os
import subprocess
import sys
import textwrap

import pytest

from synseg_jax import locks


def test_second_run_is_refused_naming_workdir_and_holder(tmp_path):
    workdir = str(tmp_path / "run")
    with locks.exclusive(workdir):
        with pytest.raises(locks.WorkdirBusyError,
                           match=rf"{workdir} is in use by another run \(pid {os.getpid()} on "):
            with locks.exclusive(workdir):
                pass
    with locks.exclusive(workdir):  # released at the end of the block
        pass


def test_lock_of_a_killed_holder_is_free(tmp_path):
    workdir = str(tmp_path / "run")
    code = textwrap.dedent(f"""
        import os, sys, time
        from synseg_jax import locks
        with locks.exclusive({workdir!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.WorkdirBusyError, match=f"pid {holder.pid} "):
            with locks.exclusive(workdir):
                pass
    finally:
        holder.kill()  # kill -9: no cleanup runs in the holder
        holder.wait()
    with locks.exclusive(workdir):
        pass
