"""Where this process sits in a (possibly one-process) job: rank, world size, device.

Built from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or from
OpenMPI's (OMPI_COMM_WORLD_SIZE/RANK/LOCAL_RANK, which the published cluster scripts relied
on; MASTER_ADDR/PORT must then be exported by the job script). Without either it is a single
process and every collective below is the identity, so the trainer has one code path.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from torch_agd.errors import UsageError

# A rank that dies or hangs must end the job, not block the others forever: every collective
# gives up after this long (docs/distributed.md says what it must exceed).
TIMEOUT_VAR = "AGD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0

TORCHRUN_HINT = "torchrun --nproc_per_node=N -m torch_agd train --distribute [flags]"


def _launcher_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or OpenMPI, or None outside a launcher."""
    for rank, size, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                              ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")):
        if size in os.environ:
            try:
                return int(os.environ[rank]), int(os.environ[size]), int(os.environ.get(local, 0))
            except (KeyError, ValueError):
                raise UsageError(f"{size} is set but {rank}/{local} are missing or not integers; "
                                 f"launch with {TORCHRUN_HINT}") from None
    return None


def launch_position() -> tuple[int, int]:
    """(rank, world_size) as the launcher set them, before any process group exists."""
    launched = _launcher_env()
    return (launched[0], launched[1]) if launched else (0, 1)


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: $AGD_DIST_TIMEOUT seconds, else 600."""
    raw = os.environ.get(TIMEOUT_VAR)
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise UsageError(f"{TIMEOUT_VAR} must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


# What gloo's plain RuntimeErrors say when a peer hung (the timeout) or went away.
_PEER_LOST = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


def collective_failure(exc: BaseException, rank: int, world_size: int) -> str | None:
    """A one-line account of ``exc`` if it is a collective that failed because another rank
    died or hung, else None (a bug keeps its traceback). Gloo raises; NCCL's watchdog ends the
    process itself after the timeout (torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING)."""
    text = str(exc)
    if not (isinstance(exc, dist.DistError) or isinstance(exc, RuntimeError) and any(m in text for m in _PEER_LOST)):
        return None
    cause = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = f"waited {TIMEOUT_VAR}={timeout().total_seconds():g} s for another process, which hung or died"
    else:
        what = "lost contact with another process, which died or whose machine failed"
    return f"rank {rank} of {world_size}: {what}; the job stops [{cause}]"


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # --fsdp: a process group even for one process

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def create(cls, *, cpu: bool = False, distribute: bool = False, fsdp: bool = False) -> "DistEnv":
        """Read the launcher's environment, pick the device, and join the process group (for
        ``fsdp`` also on one process: FSDP2 shards over a device mesh, which needs one)."""
        launched = _launcher_env()
        rank, world_size, local_rank = launched or (0, 1, 0)
        pg_timeout = timeout()  # a bad value is an error even on one process
        if distribute and launched is None:
            raise UsageError(f"--distribute needs a launcher that starts one process per device: {TORCHRUN_HINT}")
        use_cuda = not cpu and torch.cuda.is_available()
        if use_cuda:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        env = cls(rank, world_size, local_rank, device, sharded=fsdp)
        backend = "nccl" if use_cuda else "gloo"
        if fsdp and world_size == 1 and not dist.is_initialized():
            # A group of one, in memory: no port to pick, nothing to rendezvous with.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=pg_timeout, device_id=device if use_cuda else None)
        if world_size > 1 and not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise UsageError(f"{var} is not set: export MASTER_ADDR and MASTER_PORT, or use {TORCHRUN_HINT}")
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=pg_timeout, device_id=device if use_cuda else None)
        return env

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (identity for one process); returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensors) -> None:
        """Overwrite each tensor with rank 0's copy (e.g. BatchNorm statistics before evaluation)."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src=0)

    def broadcast_object(self, obj):
        """Rank 0's picklable ``obj`` on every rank (e.g. the run directory's name)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if (self.distributed or self.sharded) and dist.is_initialized():
            dist.destroy_process_group()
