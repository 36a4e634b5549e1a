"""Several processes, one run: how many (devices x nodes, or what torchrun / srun started) and who does what.

Fabric finds the cluster it runs in by itself (TorchElastic, i.e. ``torchrun``, first, then SLURM's ``srun``)
and takes the ranks from it; :func:`process_layout` gives it the matching ``devices`` and ``num_nodes``, read
from the launcher when they were left at their defaults, so ``torchrun --nnodes 2 --nproc-per-node 4 -m medvox
train ...`` needs no flag of its own, and a count that disagrees with the launcher's fails at once, by name.

In a run of several processes, global rank 0 alone reads the fold folder to decide (reuse, resume, refuse),
builds the preprocessing cache and writes the run folder; the others follow its decision
(:func:`on_rank_zero`) and read the cache once it is built (:func:`rank_zero_first`). The ordering is made with
collectives, not file locks: ``flock`` on a shared file system is node-local or missing on some (Lustre
mounted with ``localflock``, NFS without a lock daemon), and there two nodes would otherwise build the same
store at once.
"""

from __future__ import annotations

import copy
import datetime
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from medvox.config import ConfigError, TrainConfig

T = TypeVar("T")

# How long the other ranks wait for rank 0's part (a first preprocessing of a large dataset can take hours);
# a rank that dies closes its sockets, and the waiting ranks fail at once rather than at this limit.
RANK_ZERO_WAIT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Layout:
    """The processes of a run: ``devices`` per node (-1: every visible GPU) on ``num_nodes`` nodes, and the
    launcher that started them (``"torchrun"``, ``"srun"``) or None (Fabric starts the local ones itself)."""

    devices: int
    num_nodes: int
    launcher: str | None = None


def fabric_module():
    """``lightning_fabric`` (our dependency), or the same Fabric bundled as ``lightning.fabric``.

    Both are the same code; we depend on the standalone package because the full ``lightning`` one
    installs torchmetrics, and Fabric imports whatever torchmetrics is installed (with matplotlib and
    SciPy's signal module) to check its version: about 1 s of every start-up on a 2-core CPU.
    """
    try:
        import lightning_fabric
    except ImportError:  # an environment with the full `lightning` package only
        import lightning.fabric as lightning_fabric
    return lightning_fabric


def external_launcher() -> tuple[str, int, int] | None:
    """``(launcher, processes per node, nodes)`` when torchrun or srun started this process, else None; the
    same detection, in the same order, as Fabric's own."""
    envs = fabric_module().plugins.environments
    env = os.environ
    if envs.TorchElasticEnvironment.detect():
        world = int(env["WORLD_SIZE"])
        per_node = int(env.get("LOCAL_WORLD_SIZE") or world)
        return "torchrun", per_node, max(1, world // per_node)
    if envs.SLURMEnvironment.detect():
        tasks, nodes = int(env.get("SLURM_NTASKS") or 1), int(env.get("SLURM_NNODES") or 1)
        return "srun", int(env.get("SLURM_NTASKS_PER_NODE") or max(1, tasks // nodes)), nodes
    return None


def process_layout(tc: TrainConfig, gpu: bool) -> Layout:
    """The ``devices`` and ``num_nodes`` to give Fabric for ``tc`` (``gpu``: training on CUDA devices).

    Under torchrun / srun the launcher's counts are used where ``--devices`` / ``--num-nodes`` were not given;
    given ones must agree with it. Without a launcher, ``--num-nodes N`` > 1 is Lightning's own multi-node
    launch: the same command on every node with ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.

    Raises:
        ConfigError: the counts disagree with the launcher's, or a multi-node run lacks what finds its peers.
    """
    launched = external_launcher()
    if launched is None:
        devices = tc.devices if tc.devices is not None else (-1 if tc.multi_gpu and gpu else 1)
        if tc.num_nodes > 1:
            missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
            if missing:
                raise ConfigError(
                    f"--num-nodes {tc.num_nodes}: this process was not started by torchrun or srun, and "
                    f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Start it on every node "
                    f"with `torchrun --nnodes {tc.num_nodes} --nproc-per-node N --node-rank R --master-addr HOST "
                    "--master-port PORT -m medvox ...`, with `srun` in a SLURM job, or set NODE_RANK (0 on the "
                    "first node), MASTER_ADDR and MASTER_PORT (the first node's address and a free port) on each")
        return Layout(devices, tc.num_nodes)
    name, per_node, nodes = launched
    devices = per_node if tc.devices is None else tc.devices
    num_nodes = nodes if tc.num_nodes == 1 else tc.num_nodes
    if (devices, num_nodes) != (per_node, nodes):
        how = ("torchrun --nnodes / --nproc-per-node" if name == "torchrun"
               else "#SBATCH --nodes / --ntasks-per-node (one task per process)")
        raise ConfigError(
            f"--devices {devices} x --num-nodes {num_nodes}: {name} started {per_node} process(es) per node on "
            f"{nodes} node(s). Leave --devices / --num-nodes out to take {name}'s counts, or set {how} to match")
    return Layout(devices, num_nodes, name)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of the run, where no Fabric object is at hand (``medvox cv``
    between folds); the helpers below take it or a Fabric."""

    world_size: int = 1
    global_rank: int = 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0


def current_ranks() -> Ranks:
    """The world of the process group training started (one process when none was)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_world_size(), dist.get_rank())
    return Ranks()


def launched_as_rank_zero() -> bool:
    """Whether this process will be global rank 0, known before Fabric starts (from the launcher's variables:
    torchrun's ``RANK``, srun's ``SLURM_PROCID``, Lightning's ``NODE_RANK`` / ``LOCAL_RANK``)."""
    launched = external_launcher()
    env = os.environ
    if launched is not None and launched[0] == "torchrun":
        return int(env.get("RANK") or 0) == 0
    if launched is not None:
        return int(env.get("SLURM_PROCID") or 0) == 0
    return int(env.get("NODE_RANK") or 0) == 0 and int(env.get("LOCAL_RANK") or 0) == 0


def _portable(exc: BaseException) -> BaseException:
    """``exc`` when it survives pickling (to be raised on the other ranks as it is), else a RuntimeError
    with its text."""
    try:
        pickle.dumps(exc)  # it can be sent ...
        return copy.copy(exc)  # ... and rebuilt from its reduce tuple, as the receiving rank does
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _gather(fabric, produce: Callable[[], Any], timeout: datetime.timedelta) -> list[Any]:
    """``produce()`` on every rank, gathered on every rank (in rank order). The group of its own is made before
    ``produce`` runs and has its own ``timeout``: the default group's 30 minutes are for training steps, and
    rank 0's part may be a first preprocessing of a large dataset."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        mine = produce()
        everyone: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(everyone, mine, group=group)
        return everyone
    finally:
        dist.destroy_process_group(group)


def _attempt(fn: Callable[[], T], kept: list) -> tuple[bool, Any]:
    """``(True, None)`` with ``fn()``'s result appended to ``kept``, or ``(False, error)`` with the error that
    was raised appended to ``kept`` and a picklable copy returned."""
    try:
        kept.append(fn())
        return True, None
    except Exception as exc:
        kept.append(exc)
        return False, _portable(exc)


def on_rank_zero(fabric, fn: Callable[[], T], timeout: datetime.timedelta = RANK_ZERO_WAIT) -> T:
    """``fn()`` on global rank 0 alone; its result (picklable) is returned on every rank, and what it raised is
    raised on every rank, so no rank is left waiting for one that failed. With one process: ``fn()``."""
    if fabric.world_size == 1:
        return fn()
    kept: list[Any] = []

    def produce():
        if not fabric.is_global_zero:
            return None
        ok, error = _attempt(fn, kept)
        return (True, kept[0]) if ok else (False, error)

    ok, value = _gather(fabric, produce, timeout)[0]
    if not ok:
        raise kept[0] if fabric.is_global_zero else value
    return value


def all_or_none(fabric, fn: Callable[[], T], timeout: datetime.timedelta = RANK_ZERO_WAIT) -> T:
    """``fn()`` on every rank, each keeping its own result; when it raised on any rank, it raises on every rank
    (that rank's own error, the lowest failing rank's on the others), so no rank goes on to wait for a dead one."""
    if fabric.world_size == 1:
        return fn()
    kept: list[Any] = []
    outcomes = _gather(fabric, lambda: _attempt(fn, kept), timeout)
    failed = [(rank, error) for rank, (ok, error) in enumerate(outcomes) if not ok]
    if not failed:
        return kept[0]
    if isinstance(kept[0], BaseException):
        raise kept[0]
    rank, error = failed[0]
    raise error from RuntimeError(f"raised on rank {rank}")


def rank_zero_first(fabric, fn: Callable[[], T], timeout: datetime.timedelta = RANK_ZERO_WAIT) -> T:
    """``fn()`` on global rank 0, then, once it succeeded, on the other ranks (each keeps its own result): rank 0
    builds the preprocessing cache and the others find it built. A failure on any rank is raised on every rank."""
    first: list[Any] = []
    on_rank_zero(fabric, lambda: first.append(fn()), timeout)
    return all_or_none(fabric, lambda: first[0] if fabric.is_global_zero else fn(), timeout)
