"""Device mesh, shardings and the step from process-local batches to global arrays.

One code path serves one device, many devices and many hosts: every jitted function sees global
``jax.Array``s whose batch dimension is sharded over the single ``"data"`` mesh axis, while
parameters are replicated. Each process feeds only its own slice of a batch (its tf.data shard);
``to_global`` stitches those slices into one logical array without moving data between hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over ``num_devices`` devices (default: all) with the axis ``"data"``.

    The axis is ``Auto``: with ``jax.make_mesh``'s default ``Explicit`` axes, ops whose output
    sharding JAX cannot infer (e.g. ``bincount`` on batch-sharded labels, used by the confusion
    matrix) raise ``ShardingTypeError``; Auto lets the compiler choose, which is what a plain
    data-parallel program wants.
    """
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if not 0 < num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    if jax.process_count() > 1 and num_devices != len(devices):
        # Every process must own part of the mesh, or its local batch would have nowhere to go.
        raise ValueError(
            f"num_devices={num_devices} must equal the global device count {len(devices)} "
            f"when running {jax.process_count()} processes")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``"data"``, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def to_global(local_tree: Any, mesh: Mesh) -> Any:
    """Process-local batch (numpy leaves, leading dim = local batch) → global batch-sharded arrays.

    The global leading dimension is the local one times ``jax.process_count()``; processes must
    pass equal local batch sizes (``local_batch_size`` guarantees that).
    """
    sharding = data_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("to_global needs a batch dimension on every leaf; got a scalar")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local_tree)


def local_batch_size(global_batch: int, *, num_processes: int | None = None,
                     num_devices: int | None = None) -> int:
    """This process's share of ``global_batch``; every device must get the same number of examples.

    ``num_processes`` and ``num_devices`` default to the running JAX's global counts.
    """
    num_processes = jax.process_count() if num_processes is None else num_processes
    num_devices = jax.device_count() if num_devices is None else num_devices
    if global_batch <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch}")
    if global_batch % num_processes:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the number of processes "
            f"{num_processes}")
    if global_batch % num_devices:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the number of devices "
            f"{num_devices}")
    return global_batch // num_processes


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, *,
                                 auto_detect: bool = False) -> bool:
    """Join a multi-process JAX job if one is described; returns whether ``initialize`` ran.

    With no arguments this is a no-op (single process), so launchers can always call it.
    ``auto_detect`` lets JAX read whatever is not given from the cluster environment (Cloud TPU,
    SLURM, ...).
    Must run before anything touches a device.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if not auto_detect:
        if all(v is None for v in explicit) or num_processes == 1:
            return False
        if any(v is None for v in explicit):
            raise ValueError(
                "coordinator_address, num_processes and process_id must be given together; got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if jax.distributed.is_initialized():
        return False
    # Under auto_detect, arguments left as None are filled in from the cluster environment.
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
