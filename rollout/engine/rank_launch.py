"""Starting the processes of a tensor-parallel engine: ranks 1..N-1 here, rank 0 by ``process.py``.

Each rank is a spawned process on its own device. Rank 0 runs the engine loop (scheduler, cache,
front-end queues); the others run ``Follower``. The launcher creates the queues they share: one
control queue per follower (commands from rank 0) and one report queue back to rank 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from rollout.distributed.rank_setup import RankSetup, close_rank, init_rank, rank_setups
from rollout.engine.parent_watch import exit_with_parent

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RankLinks:
    """What rank 0 needs to reach the others (picklable: it goes to rank 0's process)."""

    setup: RankSetup
    controls: list[Any]  # one multiprocessing queue per rank 1..N-1
    reports: Any  # one multiprocessing queue from all of them


def rank_options(options: dict[str, Any], links: RankLinks | None) -> dict[str, Any]:
    """``options`` with the device of the rank ``links`` belongs to (unchanged for one rank)."""
    return options if links is None else {**options, "device": links.setup.device}


def spawn_followers(ctx: Any, model_path: str, options: dict[str, Any]) -> tuple[list[Any], RankLinks | None]:
    """Start ranks 1..N-1 (they wait for rank 0); returns their processes and rank 0's links."""
    from dataclasses import fields

    from rollout.config import ParallelConfig

    par = ParallelConfig(**{f.name: options[f.name] for f in fields(ParallelConfig) if f.name in options})
    if par.ranks == 1:
        return [], None
    setups = rank_setups(str(options.get("device", "cpu")), par.ranks, par.expert_parallel, par.ep_spare_slots)
    controls = [ctx.Queue() for _ in setups[1:]]
    reports = ctx.Queue()
    procs = []
    for setup, control in zip(setups[1:], controls):
        proc = ctx.Process(target=follower_main, args=(model_path, {**options, "device": setup.device}, setup,
                                                       control, reports, os.getpid()),
                           name=f"rollout-engine-rank{setup.rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs, RankLinks(setups[0], controls, reports)


def build_rank0(model_path: str, options: dict[str, Any], links: RankLinks):
    """Rank 0's ``EngineCore``, after every rank has joined the engine's world."""
    from rollout.config import EngineConfig
    from rollout.distributed.step_channel import StepChannel
    from rollout.engine.core import EngineCore
    from rollout.engine.ranks import Followers

    config = EngineConfig.build(model_path, **options)
    groups = init_rank(links.setup)
    followers = Followers(StepChannel(groups.plan, groups.tp.size), links.controls, links.reports)
    if torch.device(config.device).type == "cuda":
        with torch.cuda.device(torch.device(config.device)):
            return EngineCore(config, groups.tp, followers)
    return EngineCore(config, groups.tp, followers)


def follower_main(model_path: str, options: dict[str, Any], setup: RankSetup, controls: Any, reports: Any,
                  parent: int) -> None:
    """Entry point of rank ``setup.rank`` > 0: build its shard, then follow rank 0 until it stops (or
    until process ``parent``, the front end, is gone)."""
    from rollout.config import EngineConfig
    from rollout.engine.follower import Follower

    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s engine-rank{setup.rank} %(levelname)s %(message)s")
    exit_with_parent(parent)
    try:
        config = EngineConfig.build(model_path, **options)
        groups = init_rank(setup)
        Follower(config, groups, controls, reports).run()
    except BaseException:
        # Rank 0 and the launcher see this rank's exit; the cause is in this log.
        logger.exception("engine rank %d failed", setup.rank)
        raise SystemExit(1) from None
    close_rank()
