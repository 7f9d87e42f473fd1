"""Control commands that every engine rank applies, coordinated by rank 0.

Rank 0 checks what it can first (so a bad command reaches no rank), hands the command to the other
ranks, applies it itself, then waits for their reports and combines them: the caller gets one answer
for the whole engine. Weight updates are all-or-nothing across ranks: when some ranks took an update
and others did not, the ranks hold different weights, so the engine marks its weights invalid (no
generation) until an update succeeds on every rank. With one rank every method is the local call.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Callable

from rollout.control.gate import Blocker, GenerationGate
from rollout.control.weight_swap import NoRoom, UpdateCommand, WeightSwap
from rollout.engine.messages import (
    ControlCommand,
    DestroyWeightGroup,
    DropShadow,
    GetInfo,
    InitWeightGroup,
    RebalanceExperts,
    ReleaseMemory,
    ResumeMemory,
    SwitchShadow,
)
from rollout.engine.ranks import Followers, RankReport
from rollout.errors import FailedPreconditionError, RolloutError, error_from_code
from rollout.types import SwapResult

if TYPE_CHECKING:
    from rollout.control.experts import ExpertBalancer
    from rollout.control.memory import MemoryControl
    from rollout.control.weights import VersionOwner, WeightUpdater
    from rollout.engine.jobs import Background


def _error(report: RankReport) -> RolloutError:
    return error_from_code(report.error_code or "INTERNAL", f"engine rank {report.rank}: {report.error_message}")


class RankControl:
    """Rank 0's side of the commands all ranks apply (``followers`` None: a one-rank engine)."""

    def __init__(self, followers: Followers | None, weights: WeightUpdater, memory: MemoryControl,
                 gate: GenerationGate, versions: VersionOwner, experts: ExpertBalancer | None = None) -> None:
        self.followers = followers
        self._experts = experts
        self._weights = weights
        self._memory = memory
        self._gate = gate
        self._versions = versions
        # The other ranks' memory states, as of their last report (rank 1 first).
        self._rank_memory: list[dict[str, dict[str, object]]] = []

    @property
    def size(self) -> int:
        return 1 if self.followers is None else self.followers.size

    def _everywhere(self, cmd: ControlCommand, local: Callable[[], Any]) -> tuple[Any, BaseException | None,
                                                                                   list[RankReport]]:
        """Apply ``cmd`` on the other ranks and ``local()`` here, concurrently; every outcome."""
        assert self.followers is not None
        op = self.followers.control(cmd)
        result, error = None, None
        try:
            result = local()
        except Exception as e:  # noqa: BLE001 - combined with the other ranks' outcomes below
            error = e
        reports = self.followers.wait(op)
        self._rank_memory = [r.memory for r in reports]
        return result, error, reports

    # ------------------------------------------------------------------ weights
    def update_weights(self, cmd: ControlCommand, local: Callable[[], int]) -> int:
        """A weight update on every rank; the version changes only if every rank took it."""
        if self.followers is None:
            return local()
        result, error, reports = self._everywhere(cmd, local)
        failed = [r for r in reports if r.error_code]
        partial = [r for r in reports if not r.weights_valid]
        if (error is None) != (not failed):  # some ranks took it, some did not
            who = f"engine rank {failed[0].rank}: {failed[0].error_message}" if failed else (
                f"engine rank 0: {error}")
            self._invalidate(f"the weights differ between engine ranks after a failed update ({who}); "
                             "push a full set of weights")
        elif partial:
            self._invalidate(f"engine rank {partial[0].rank} holds partly written weights; push a full set of weights")
        if failed or partial or error is not None:
            # Rank 0's open update in calls must not count this call's writes (or its earlier calls')
            # toward a full update: the later calls would clear the block while the ranks differ.
            self._weights.forget_open_update()
        if error is not None:
            raise error
        if failed:
            raise _error(failed[0])
        if partial:
            raise FailedPreconditionError(self._gate.reason())
        return result

    def swap_weights(self, cmd: UpdateCommand, swap: WeightSwap, quiesce: Callable[[], None]) -> Background:
        """A swap-mode update: every rank receives into its shadow beside the loop; once every rank
        reported its shadow ready, all switch at the same step boundary (``SwitchShadow`` goes down
        the step channel after the last step sent). ``quiesce`` collects the step in flight first.

        If any rank failed, every shadow is dropped and version v keeps serving everywhere. If any
        rank had no room for a shadow, every rank takes the update on the pausing path instead.
        """
        job = swap.start(cmd)
        followers = self.followers
        op = followers.control(cmd) if followers is not None else 0
        local = job.work

        def everywhere() -> tuple[Any, BaseException | None, list[RankReport]]:
            result, error = None, None
            try:
                result = local()
            except Exception as e:  # noqa: BLE001 - combined with the other ranks' outcomes
                error = e
            return result, error, followers.wait(op) if followers is not None else []

        def finish(outcome: tuple[Any, BaseException | None, list[RankReport]]) -> SwapResult:
            result, error, reports = outcome
            failed = [r for r in reports if r.error_code]
            if error is None:
                job_finish(result)
            if error is not None or failed:
                self._drop_shadows(op, swap)
                if error is not None:
                    swap.failed(cmd, error)
                    raise error
                raise _error(failed[0])
            no_room = [result] if isinstance(result, NoRoom) else []
            no_room += [r.result for r in reports if isinstance(r.result, NoRoom)]
            quiesce()
            if no_room:
                self._drop_shadows(op, swap)
                plain = replace(cmd, swap=False)
                return SwapResult(self.update_weights(plain, lambda: swap.fallback(plain, "").weight_version),
                                  swapped=False, note=no_room[0].reason)
            return self._switch_everywhere(op, swap)

        job_finish = job.finish
        job.work, job.finish = everywhere, finish
        return job

    def _drop_shadows(self, op: int, swap: WeightSwap) -> None:
        swap.drop()
        if self.followers is not None:
            self.followers.wait(self.followers.control(DropShadow(op)))

    def _switch_everywhere(self, op: int, swap: WeightSwap) -> SwapResult:
        if self.followers is None:
            return swap.switch()
        result, error, reports = self._everywhere(SwitchShadow(op), swap.switch)
        failed = [r for r in reports if r.error_code]
        if (error is None) != (not failed):
            who = f"engine rank {failed[0].rank}: {failed[0].error_message}" if failed else f"engine rank 0: {error}"
            self._invalidate(f"the weights differ between engine ranks after a failed switch ({who}); "
                             "push a full set of weights")
        if error is not None:
            raise error
        if failed:
            raise _error(failed[0])
        return result

    def _invalidate(self, message: str) -> None:
        self._gate.block(Blocker.WEIGHTS_INVALID, message)
        self._versions.new_kv_epoch()

    def init_group(self, cmd: InitWeightGroup) -> Background:
        """Every rank joins (rank 0 checked the command first); the reply waits for all joins."""
        job = self._weights.init_group(cmd)
        if self.followers is None:
            return job
        followers = self.followers
        op = followers.control(cmd)
        local_join = job.work

        def join_everywhere() -> Any:
            group, error = None, None
            try:
                group = local_join()
            except Exception as e:  # noqa: BLE001 - re-raised once the other ranks answered
                error = e
            failed = [r for r in followers.wait(op) if r.error_code]
            if error is None and failed:
                group.close()
                error = _error(failed[0])
            if error is not None:
                raise error
            return group

        job.work = join_everywhere
        return job

    def destroy_group(self, cmd: DestroyWeightGroup) -> str:
        if self.followers is None:
            return self._weights.destroy_group(cmd.group_name)
        result, error, _ = self._everywhere(cmd, lambda: self._weights.destroy_group(cmd.group_name))
        if error is not None:
            raise error
        return result

    # ------------------------------------------------------------------ experts
    def rebalance(self, cmd: RebalanceExperts) -> dict[str, float | int]:
        """Rank 0 plans the placements (unless given), every rank moves its experts."""
        if self._experts is None:
            raise FailedPreconditionError("expert rebalancing needs an MoE model served with ep_size > 1")
        self._experts.check_enabled()
        full = RebalanceExperts(cmd.placements or self._experts.plan())
        if self.followers is None:
            return asdict(self._experts.apply(full.placements))
        result, error, reports = self._everywhere(full, lambda: self._experts.apply(full.placements))
        failed = [r for r in reports if r.error_code]
        if error is not None or failed:
            # The ranks may hold different placements now: no output can be trusted.
            self._invalidate("an expert rebalance failed on some rank; push a full set of weights")
        if error is not None:
            raise error
        if failed:
            raise _error(failed[0])
        return asdict(result)

    # ------------------------------------------------------------------ memory
    def release(self, cmd: ReleaseMemory) -> dict[str, dict[str, object]]:
        self._memory.check_release(cmd.tags)  # a refused release reaches no rank
        return self._memory_everywhere(cmd, lambda: self._memory.release(cmd.tags))

    def resume(self, cmd: ResumeMemory) -> dict[str, dict[str, object]]:
        self._memory.check_resume(cmd.tags)
        return self._memory_everywhere(cmd, lambda: self._memory.resume(cmd.tags))

    def _memory_everywhere(self, cmd: ControlCommand, local: Callable[[], Any]) -> dict[str, dict[str, object]]:
        if self.followers is None:
            return local()
        result, error, reports = self._everywhere(cmd, local)
        if any(not r.weights_valid for r in reports) and not self._gate.blocks(Blocker.WEIGHTS_INVALID):
            self._invalidate(next(r for r in reports if not r.weights_valid).error_message
                             or "an engine rank released its weights without a backup")
        if error is not None:
            raise error
        failed = [r for r in reports if r.error_code]
        if failed:
            raise _error(failed[0])
        return result

    def rank_memory(self) -> list[dict[str, dict[str, object]]]:
        """Every rank's memory states, rank 0 first (empty for a one-rank engine)."""
        if self.followers is None:
            return []
        _, _, reports = self._everywhere(GetInfo(), lambda: None)
        return [self._memory.states(), *(r.memory for r in reports)]
