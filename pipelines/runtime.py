"""Ray plumbing shared by the stages and jobs: cluster start-up, actor-pool sizing, column checks.

Every Ray Data stage is a class that loads what it needs once in ``__init__`` and transforms one
``pyarrow.Table`` batch in ``__call__``; it names the columns it reads in ``NEEDS`` and calls
:func:`require` first, so a wrong input fails with the missing names instead of a KeyError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa


@dataclass
class PoolConfig:
    """One actor pool (``map_batches`` with a class)."""

    concurrency: int = 2
    """Actors in the pool; one per GPU on a cluster, a couple on a CPU box."""
    batch_size: int | None = 64
    """Rows per call (None: one call per block): large enough to amortise Ray's per-batch cost and fill a GPU."""
    num_cpus: float = 0.5
    """Fractional on purpose: two whole-CPU actors on a 2-core machine take every CPU and the
    read/write tasks never get scheduled (Ray Data then waits forever)."""
    num_gpus: float = 0.0
    """Set to 1 (or a fraction to share a GPU) on a GPU cluster; 0 runs on CPU."""

    def options(self) -> dict:
        """``map_batches`` keyword arguments for this pool.

        Ray Data hands every pool actor its DataContext and map function as object refs and
        restarts lost actors (``max_restarts=-1``), so Ray's core worker logs an ``E ...
        constructor arguments in the object store`` line for each pool whatever our constructor
        arguments are (ray-project/ray#57733, #53727). Restarts are worth more than a quiet log;
        the line goes to the job's log file (``make demo`` keeps those in outputs/demo/logs/)."""
        from ray.data import ActorPoolStrategy

        opts = {"compute": ActorPoolStrategy(size=self.concurrency), "batch_size": self.batch_size, "num_cpus": self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        return opts


@dataclass
class RayConfig:
    num_cpus: int | None = None
    """Logical CPUs of a local cluster (ignored when joining one via RAY_ADDRESS). None: the core
    count, but at least 4, so a 2-core machine can run reads, actors and writes side by side."""
    progress: bool = True
    """Ray Data progress bars while a pipeline runs."""


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for its laptop mode, read once when ``ray`` is imported: "0" makes a local node
use 127.0.0.1 as its address, so every server it starts binds to loopback only."""


def init_ray(cfg: RayConfig) -> bool:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a local one.

    Returns True when this call started Ray (so the caller should shut it down).
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(LOOPBACK_ENV, "0")  # before ray's first import: see start_local_ray
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            num_cpus = cfg.num_cpus or max(4, os.cpu_count() or 1)
            # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls
            # every second (and logs each failure without it); it listens on 127.0.0.1.
            start_local_ray(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
        started = True
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.enable_operator_progress_bars = cfg.progress
    return started


def start_local_ray(**init_kwargs) -> None:
    """``ray.init`` a private single-machine instance whose servers listen on 127.0.0.1 only.

    A plain local ``ray.init`` on Linux takes the machine's address as the node's and binds its
    GCS, raylet and workers to it (``_node_ip_address="127.0.0.1"`` is turned back into that
    address). With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment when ``ray`` is first
    imported, Ray uses loopback instead, as it does on a laptop. The jobs import ray lazily, so
    setting it here is in time; a process that imported ray earlier (a test session) sets it
    before that import, and is told so otherwise. ``address="local"``: never attach to a stale
    ``ray start`` left behind on this machine.
    """
    os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    node_ip = ray.util.get_node_ip_address()
    if node_ip not in ("127.0.0.1", "::1"):
        raise RuntimeError(
            f"a local Ray here would listen on {node_ip}, not 127.0.0.1: set {LOOPBACK_ENV}=0 in the "
            "environment before ray is first imported (tests/conftest.py does), or start a cluster "
            "with `ray start --head --node-ip-address=127.0.0.1` and set RAY_ADDRESS")
    ray.init(address="local", **init_kwargs)


class Chain:
    """Several light stages run one after another in the same actor.

    Ray Data never fuses two actor pools, and each pool costs processes and a hop through the
    object store; cheap stages (read, decode) are better chained in one actor.
    ``stages`` is a list of ``(class, constructor kwargs)``.
    """

    def __init__(self, stages: list[tuple[type, dict]]):
        self.stages = [cls(**kwargs) for cls, kwargs in stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch


def require(batch: pa.Table, needs: tuple[str, ...], stage: str) -> None:
    """Fail naming every column ``stage`` needs that ``batch`` lacks."""
    missing = [c for c in needs if c not in batch.column_names]
    if missing:
        raise ValueError(f"{stage} needs columns {missing}; the batch has {batch.column_names}")


def set_torch_threads(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs the actor was given (at least one)."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
