"""K across the devices of one host: a 1-D device mesh, rows of K split over it.

K (``layout`` module docstring) is placed with ``NamedSharding(mesh, P("rows", None))``:
each device holds a contiguous block of rows. Kernel-vector products run under ``shard_map``:
every device multiplies its row block by the (replicated) vector, and the row blocks of the result
are gathered. Row counts are made divisible by the device count by the capacity buckets
(``state.bucket(n, multiple=n_devices)``), whose padding rows are zero.

The mesh is part of K's layout (``layout.KernelLayout``), passed to every product, never read from
global state.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental.shard_map import shard_map
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import ResourceError

AXIS = "rows"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``rows`` over ``devices`` (default: every local device)."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.array(devices), (AXIS,))


def place(k, mesh: Mesh | None) -> jax.Array:
    """K on the mesh, rows split (a plain device array without a multi-device mesh).

    Raises:
      ValueError: rows not divisible by the device count.
    """
    if mesh is None or mesh.size == 1:
        return jax.numpy.asarray(k)
    if k.shape[0] % mesh.size:
        raise ValueError(f"K has {k.shape[0]} rows, not divisible by {mesh.size} devices")
    return jax.device_put(k, NamedSharding(mesh, P(AXIS, None)))


def matvec(k: jax.Array, v: jax.Array, mesh: Mesh, op=None) -> jax.Array:
    """K v with K's rows split over ``mesh``; v ``(rows,)`` or ``(rows, m)`` replicated. ``op(k_block,
    v)`` replaces the product on each device's rows when given."""
    spec_out = P(AXIS) if v.ndim == 1 else P(AXIS, None)
    fn = shard_map(
        op or (lambda kb, vb: jax.numpy.matmul(kb, vb, precision=jax.lax.Precision.HIGHEST)),
        mesh=mesh,
        in_specs=(P(AXIS, None), P()),
        out_specs=spec_out,
        check_rep=False,
    )
    return fn(k, v)


def bytes_per_device(k: jax.Array) -> dict[str, int]:
    """Bytes of K held by each device."""
    return {str(s.device): int(s.data.nbytes) for s in k.addressable_shards}


def device_memory_bytes(device) -> int:
    """Memory a device can give K: its allocator limit, or for CPU devices this host's RAM shared
    by all of them."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends raise or return None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        host = 1 << 62
    n_cpu = max(1, sum(1 for d in jax.local_devices() if d.platform == "cpu"))
    return host // n_cpu if device.platform == "cpu" else host


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Where K goes and whether it fits.

    Attributes:
      kernel_bytes: bytes of K (capacity-padded), total.
      per_device_bytes: bytes of K on each device.
      working_bytes: per device, K plus the solver's working set (a second copy of K while a
        deletion erases or compacts rows, and vectors).
      device_bytes: the smallest device's memory.
      budget: the fraction of ``device_bytes`` the plan may use.
      itemsize: bytes per value of K (4: float32, 8: float64).
    """

    kernel_bytes: int
    per_device_bytes: int
    working_bytes: int
    device_bytes: int
    n_devices: int
    budget: float = 0.6
    itemsize: int = 4

    @property
    def fits(self) -> bool:
        return self.working_bytes <= self.budget * self.device_bytes

    def message(self, what: str) -> str:
        gib = 2.0**30
        return (
            f"{what} needs {self.kernel_bytes / gib:.2f} GiB for K ({self.per_device_bytes / gib:.2f} GiB on each of "
            f"{self.n_devices} device(s), {self.working_bytes / gib:.2f} GiB with the solver's working copy), more "
            f"than {self.budget:.0%} of {self.device_bytes / gib:.2f} GiB per device: use fewer points, more devices, "
            + ("dtype float32 (half the bytes), " if self.itemsize > 4 else "")
            + "or the trace form (linear model)"
        )


def plan_memory(
    rows: int, itemsize: int, devices: list | None = None, budget: float = 0.6
) -> MemoryPlan:
    """Plan K of ``rows`` × ``rows`` values of ``itemsize`` bytes over ``devices``."""
    devices = jax.local_devices() if devices is None else devices
    n = len(devices)
    total = rows * rows * itemsize
    per = total // n
    return MemoryPlan(
        total,
        per,
        2 * per + 16 * rows * itemsize,
        min(device_memory_bytes(d) for d in devices),
        n,
        budget,
        itemsize,
    )


def check_fits(plan: MemoryPlan, what: str) -> None:
    """Raise ``ResourceError`` with what to change when ``plan`` does not fit."""
    if not plan.fits:
        raise ResourceError(plan.message(what))
