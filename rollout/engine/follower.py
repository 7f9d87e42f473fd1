"""A tensor-parallel engine rank other than 0: runs rank 0's steps on its shard of the model.

It has no scheduler and no cache manager. It keeps a copy of the request table (rank 0's writes
arrive with each step), its own KV pool for its share of the heads, its own weights, groups and
memory. Control commands arrive in the order rank 0 applies them; each gets a ``RankReport``.
A weight-group join runs beside the loop (as on rank 0), and reports when it ends.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from rollout.cache.req_table import ReqToTokenTable
from rollout.config import EngineConfig
from rollout.control.experts import ExpertBalancer
from rollout.control.gate import Blocker, GenerationGate
from rollout.control.memory import MemoryControl
from rollout.control.weight_swap import NoRoom, WeightSwap
from rollout.control.weights import WeightUpdater
from rollout.distributed.rank_setup import RankGroups
from rollout.distributed.step_channel import Kind, StepChannel
from rollout.engine.jobs import Background
from rollout.engine.messages import (
    DestroyWeightGroup,
    DropShadow,
    GetInfo,
    InitWeightGroup,
    RebalanceExperts,
    ReleaseMemory,
    ResumeMemory,
    SwitchShadow,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
)
from rollout.engine.ranks import RankReport
from rollout.errors import RolloutError
from rollout.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

CONTROL_WAIT_S = 60.0  # a command is queued before its marker is sent: it is there at once


class RankVersion:
    """This rank's record of the weight version (rank 0's scheduler owns the real one)."""

    def __init__(self) -> None:
        self.weight_version = 0

    def new_weights(self, version: int) -> None:
        self.weight_version = version

    def new_kv_epoch(self) -> None:
        """Nothing to do: the prefix cache lives on rank 0."""


class Follower:
    """Rank ``groups.tp.rank`` (> 0) of an engine."""

    def __init__(self, config: EngineConfig, groups: RankGroups, controls: Any, reports: Any) -> None:
        self.rank = groups.tp.rank
        self.runner = ModelRunner(config, groups.tp)
        rows, positions = config.request_table_shape
        self.table = ReqToTokenTable(rows, positions, self.runner.device)
        self.runner.prepare(self.table)
        self.channel = StepChannel(groups.plan, groups.tp.size)
        self.gate = GenerationGate()
        self.version = RankVersion()
        self.weights = WeightUpdater(config.model, self.runner, self.version, self.gate, follower=True)
        self.swap = WeightSwap(self.weights, self.runner, self.version)
        self.memory = MemoryControl(self.runner.memory, None, self.runner, self.gate)
        self.memory.on_weights_lost = self.weights.forget_open_update
        self.experts = ExpertBalancer(self.runner.model)
        self._controls = controls
        self._reports = reports
        self._jobs: dict[int, Background] = {}  # op -> a join running beside the loop
        self._reported: set[int] = set()  # ops of jobs whose report went out

    def run(self) -> None:
        """Follow rank 0 until it says stop."""
        while True:
            msg = self.channel.recv()
            self._finish_jobs()
            if msg.kind is Kind.STOP:
                break
            if msg.kind is Kind.STEP:
                self.table.apply_journal(msg.writes)
                self.runner.launch(msg.plan)
            else:
                self._control(msg.op)
        self.runner.close()

    def _control(self, op: int) -> None:
        got, command = self._controls.get(timeout=CONTROL_WAIT_S)
        if got != op:  # the queue and the channel are out of step: nothing after this is safe
            raise RuntimeError(f"control {got} arrived for marker {op}")
        report = RankReport(op, self.rank)
        try:
            result = self._apply(op, command)
            if isinstance(result, Background):
                return  # it reports when it ends
            report.result = result
        except RolloutError as e:
            report.error_code, report.error_message = e.code, e.message
        except Exception as e:  # keep following; rank 0 hands the cause to the caller
            logger.exception("rank %d: %s failed", self.rank, type(command).__name__)
            report.error_code, report.error_message = "INTERNAL", f"{type(e).__name__}: {e}"
        self._send(report)

    def _apply(self, op: int, command: Any) -> Any:
        match command:
            case InitWeightGroup():
                self.weights.drop_group(command.group_name)  # rank 0 found none: an old one failed to form
                job = self.weights.init_group(command)
                self._start(op, job)
                return job
            case DestroyWeightGroup(group_name=name):
                self.weights.drop_group(name)
                return name
            case UpdateWeightsFromDistributed() | UpdateWeightsFromTensor() | UpdateWeightsFromDisk():
                self.memory.check_weights_writable()
                if not command.swap:
                    return self.weights.apply(command)
                # Received beside this rank's loop; it reports when its shadow is ready (or has no
                # room), and switches when rank 0 sends SwitchShadow.
                job = self.swap.start(command)
                self._start(op, job, summary=lambda r: r if isinstance(r, NoRoom) else "ready")
                return job
            case SwitchShadow():
                return self.swap.switch()
            case DropShadow():
                self.swap.drop()
                return None
            case ReleaseMemory(tags=tags):
                return self.memory.release(tags)
            case ResumeMemory(tags=tags):
                return self.memory.resume(tags)
            case RebalanceExperts(placements=placements):
                return self.experts.apply(placements)
            case GetInfo():
                return None
        raise RuntimeError(f"rank {self.rank} cannot apply {type(command).__name__}")

    def _start(self, op: int, job: Background, summary: Callable[[Any], Any] | None = None) -> None:
        """Run a join beside the loop; its report goes out from its thread the moment it ends (rank 0
        may be idle, sending nothing that would wake this loop). The loop registers the group
        (``_finish_jobs``) before it handles rank 0's next message, which rank 0 only sends after
        this report. ``summary`` turns the work's result into the report's (which crosses processes)."""
        work = job.work

        def work_and_report() -> Any:
            report = RankReport(op, self.rank)
            try:
                value = work()
                if summary is not None:
                    report.result = summary(value)
                return value
            except BaseException as e:
                report.error_code = e.code if isinstance(e, RolloutError) else "INTERNAL"
                report.error_message = e.message if isinstance(e, RolloutError) else f"{type(e).__name__}: {e}"
                raise
            finally:
                self._reported.add(op)
                self._send(report)

        job.work = work_and_report
        self._jobs[op] = job
        job.start()

    def _finish_jobs(self) -> None:
        for op in [o for o in self._jobs if o in self._reported]:
            job = self._jobs.pop(op)
            self._reported.discard(op)
            job.future.exception()  # waits out the moment between the report and the future's result
            try:
                job.complete()
            except BaseException:  # noqa: BLE001 - reported already
                pass

    def _send(self, report: RankReport) -> None:
        report.weights_valid = not self.gate.blocks(Blocker.WEIGHTS_INVALID)
        report.memory = self.memory.states()
        self._reports.put(report)
