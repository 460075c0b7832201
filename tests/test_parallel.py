"""Tests for parallel.py. Multi-device checks run in subprocesses: JAX reads the fake-device flag
only at start-up, and pytest may already have started JAX with one device in this process."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from synseg_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def start_python(code: str, devices: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            env=python_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout=120, check: bool = True) -> str:
    """The process's output once it ends (a failure past `timeout`); `check`: it must succeed."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"subprocess timed out:\n{out[-5000:]}")
    if check:
        assert proc.returncode == 0, out
    return out


def test_eight_fake_devices():
    out = finish(start_python("""
        import jax, jax.numpy as jnp, numpy as np, pytest
        from synseg_jax import parallel

        assert jax.device_count() == 8
        mesh = parallel.make_mesh()
        assert mesh.shape == {"data": 8}
        assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
        assert parallel.make_mesh(4).shape == {"data": 4}
        with pytest.raises(ValueError, match="9 but 8"):
            parallel.make_mesh(9)

        local = {"image": np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3),
                 "label": (np.arange(16 * 4) % 19).astype(np.uint8).reshape(16, 4),
                 "mask": np.arange(16) < 13}
        glob = parallel.to_global(local, mesh)
        for key, value in glob.items():
            assert value.shape == local[key].shape and value.dtype == local[key].dtype
            assert value.sharding == parallel.data_sharding(mesh)
            assert len(value.sharding.device_set) == 8
            assert {s.data.shape[0] for s in value.addressable_shards} == {2}
            np.testing.assert_array_equal(np.asarray(value), local[key])
        # Each device holds its own consecutive slice of the batch.
        for shard in glob["image"].addressable_shards:
            np.testing.assert_array_equal(shard.data, local["image"][shard.index])

        # The Explicit-axis pitfall: bincount of batch-sharded labels must compile on this mesh.
        counts = jax.jit(lambda l: jnp.bincount(l.reshape(-1), length=19),
                         out_shardings=parallel.replicated(mesh))(glob["label"])
        np.testing.assert_array_equal(counts, np.bincount(local["label"].ravel(), minlength=19))

        assert parallel.local_batch_size(16) == 16
        for bad in (12, 4):
            with pytest.raises(ValueError, match=f"global batch size {bad} is not divisible by "
                                                 "the number of devices 8"):
                parallel.local_batch_size(bad)
        with pytest.raises(ValueError, match="scalar"):
            parallel.to_global({"step": np.int32(3)}, mesh)
        print("OK")
        """, 8))
    assert "OK" in out


def test_local_batch_size_arithmetic():
    assert parallel.local_batch_size(16, num_processes=2, num_devices=8) == 8
    assert parallel.local_batch_size(10, num_processes=1, num_devices=1) == 10
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the number of "
                                         "processes 4"):
        parallel.local_batch_size(6, num_processes=4, num_devices=8)
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the number of "
                                         "devices 8"):
        parallel.local_batch_size(12, num_processes=2, num_devices=8)
    with pytest.raises(ValueError, match="positive"):
        parallel.local_batch_size(0)


def test_maybe_initialize_distributed_noops_and_argument_errors():
    assert parallel.maybe_initialize_distributed() is False
    assert parallel.maybe_initialize_distributed("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(ValueError, match="given together"):
        parallel.maybe_initialize_distributed("127.0.0.1:1234", 2, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_form_one_global_batch():
    """Two local processes with 4 fake devices each: 2 x local batch 4 → global batch 8."""
    code = """
        import sys
        import numpy as np
        from synseg_jax import parallel
        pid = int(sys.argv[1])
        assert parallel.maybe_initialize_distributed(sys.argv[2], 2, pid)
        import jax, jax.numpy as jnp
        assert jax.process_count() == 2 and jax.device_count() == 8
        mesh = parallel.make_mesh()
        bs = parallel.local_batch_size(8)
        assert bs == 4
        local = np.full((bs, 3), pid, np.float32) + np.arange(bs, dtype=np.float32)[:, None] * 10
        glob = parallel.to_global({"x": local}, mesh)["x"]
        assert glob.shape == (8, 3)
        total = jax.jit(lambda x: jnp.sum(x[:, 0] * 100 + x[:, 1]),
                        out_shardings=parallel.replicated(mesh))(glob)
        # Process 0 holds rows 0..3, process 1 rows 4..7.
        expect = sum((p + 10 * i) * 101 for p in (0, 1) for i in range(4))
        assert float(total) == expect, (float(total), expect)
        for shard in glob.addressable_shards:
            assert shard.index[0].start // 4 == pid
        print("OK", pid)
        """
    address = f"127.0.0.1:{free_port()}"
    procs = [start_python(code, 4, str(pid), address) for pid in (0, 1)]
    try:
        outs = [finish(p, timeout=180) for p in procs]
    finally:
        for p in procs:  # a failed peer must not leave the other one waiting on the coordinator
            if p.poll() is None:
                p.kill()
                p.communicate()
    for pid, out in enumerate(outs):
        assert f"OK {pid}" in out, out


def test_auto_detect_joins_the_job_that_slurm_describes():
    """What `main --distributed=auto` does under launch/slurm.sbatch: two processes that are
    given nothing but SLURM's variables find each other."""
    code = """
        import jax
        from synseg_jax import parallel
        assert parallel.maybe_initialize_distributed(auto_detect=True)
        assert jax.process_count() == 2 and jax.device_count() == 4
        print("OK", jax.process_index())
        """
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
                 "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                 "JAX_COORDINATOR_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                                      env={**python_env(2), **slurm}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [finish(p, timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, out in enumerate(outs):
        assert f"OK {rank}" in out, out
