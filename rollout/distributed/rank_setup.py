"""Setting up the engine's ranks: which device each rank runs on and the process groups they share.

An engine of ``tp_size`` ranks is ``tp_size`` processes on one host. They form one torch.distributed
world of their own (rendezvous on a local TCP port chosen by the launcher), which is the
tensor-parallel group; on CUDA it uses NCCL, and a second, gloo group carries the step plans that
rank 0 broadcasts (they are host data). On CPU both are one gloo group.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rollout.distributed.tp import TPGroup
from rollout.errors import InvalidArgumentError, quoted

# How long ranks wait for each other at start-up and in a collective before failing. A dead rank is
# noticed by the launcher (process exit) long before this; it only bounds a rank that hangs.
RANK_TIMEOUT_S = 1800.0


@dataclass(frozen=True, slots=True)
class RankSetup:
    """One rank's place among the engine's ranks (picklable: it goes to the rank's process)."""

    rank: int
    size: int
    port: int  # rendezvous port on 127.0.0.1
    device: str  # this rank's device ("cpu" or "cuda:N")
    expert_parallel: bool = False  # MoE layers hold whole experts per rank
    spare_expert_slots: int = 0


@dataclass(frozen=True, eq=False)
class RankGroups:
    """The groups one rank takes part in: ``tp`` for the model's collectives, ``plan`` (gloo) for
    rank 0's step plans."""

    tp: TPGroup
    plan: dist.ProcessGroup | None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_devices(device: str, tp_size: int) -> list[str]:
    """The device of each rank: all ``cpu``, or consecutive CUDA devices from ``device``'s index."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return [str(dev)] * tp_size
    first = dev.index or 0
    count = torch.cuda.device_count()
    if first + tp_size > count:
        raise InvalidArgumentError(
            f"tp_size {tp_size} from {quoted(device)} needs CUDA devices {first}..{first + tp_size - 1}; "
            f"this machine has {count}", field="tp_size")
    return [f"cuda:{first + r}" for r in range(tp_size)]


def rank_setups(device: str, ranks: int, expert_parallel: bool = False, spare_expert_slots: int = 0
                ) -> list[RankSetup]:
    """One ``RankSetup`` per rank, sharing a fresh rendezvous port."""
    port = free_port()
    return [RankSetup(r, ranks, port, d, expert_parallel, spare_expert_slots)
            for r, d in enumerate(rank_devices(device, ranks))]


def init_rank(setup: RankSetup) -> RankGroups:
    """Join the engine's world (blocks until every rank has joined) and return this rank's groups."""
    timeout = datetime.timedelta(seconds=RANK_TIMEOUT_S)
    cuda = setup.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(setup.device))
    dist.init_process_group(
        backend="nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{setup.port}",
        rank=setup.rank, world_size=setup.size, timeout=timeout,
    )
    plan = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    tp = TPGroup(setup.rank, setup.size, dist.group.WORLD, setup.expert_parallel, setup.spare_expert_slots)
    return RankGroups(tp, plan)


def close_rank() -> None:
    """Leave the engine's world (at the end of a rank process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
