"""One run on many processes: ``torchrun --nproc-per-node N -m hier train ...``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; hier reads them here and
nowhere else. The choices (device, backend, per-rank batch) are pure functions of what they read, tested
on CPU; the collectives are torch.distributed's own (NCCL on GPUs, gloo on CPUs) and run on CPU in the
tests with two gloo processes. ``--batch-size`` is the global batch: each rank takes its share, so a run
on N processes steps on the same batches as one process with the same seed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from hier.errors import HierError

# Rank 0 alone validates, writes the checkpoint and, at the end, computes the class statistics while the
# others wait in the next collective: long on a big validation set on CPUs, so the default 30 minutes is
# raised. A rank that dies is noticed by torchrun at once, whatever this timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The process's place in a torchrun launch (one process of one when not launched by it)."""
    try:
        world = World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError:
        raise HierError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if not (world.size >= 1 and 0 <= world.rank < world.size and world.local_rank >= 0):
        raise HierError(f"rank {world.rank} of world size {world.size} is not a place in a launch")
    return world


def device_for(world: World, cuda_devices: int) -> str:
    """Each rank on its own GPU (``LOCAL_RANK`` on its node), else the CPU."""
    if not cuda_devices:
        return "cpu"
    if world.local_rank >= cuda_devices:
        raise HierError(f"local rank {world.local_rank} but only {cuda_devices} GPU(s) on this node; "
                        "use --nproc-per-node <= the GPU count")
    return f"cuda:{world.local_rank}"


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_batch(global_batch: int, world: World) -> int:
    """Each rank's share of ``--batch-size`` (the global batch)."""
    if global_batch % world.size:
        raise HierError(f"--batch-size {global_batch} does not split evenly over {world.size} processes; "
                        f"use a multiple of {world.size}")
    return global_batch // world.size


@contextmanager
def joined(world: World, device: str) -> Iterator[World]:
    """The process group for the duration of a run (nothing to join for one process)."""
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def peer_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank of the launch is gone (killed, or
    stopped on an error of its own): gloo's and NCCL's connection errors, torch's DistBackendError."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(e)
    return isinstance(e, backend_error) or any(s in text for s in ("gloo", "NCCL", "Connection reset by peer",
                                                                  "Connection closed by peer"))


def _reduced(value: float, op, world: World, device: str) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64 if device == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def any_rank(flag: bool, world: World, device: str) -> bool:
    """True on every rank when it is true on one (a ``nan`` loss stops them all, at the same step)."""
    return bool(_reduced(float(flag), dist.ReduceOp.MAX, world, device))


def mean_over_ranks(value: float, world: World, device: str) -> float:
    """The ranks' mean (each rank's training loss is over its share of the global batch)."""
    return _reduced(value, dist.ReduceOp.SUM, world, device) / world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_rows(part: torch.Tensor, total: int, world: World) -> torch.Tensor:
    """Rows ``rank::size`` of a tensor from each rank -> every row, in order, on every rank (the frozen
    stage's cached features: each rank computes its share once, all train on the whole cache)."""
    if not world.distributed:
        return part
    rows = -(-total // world.size)
    padded = part.new_zeros((rows, *part.shape[1:]))
    padded[:len(part)] = part
    pieces = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(pieces, padded)
    out = part.new_empty((total, *part.shape[1:]))
    for r, piece in enumerate(pieces):
        out[r::world.size] = piece[:len(range(r, total, world.size))]
    return out
