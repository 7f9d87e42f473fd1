"""WeightUpdater: the engine's weight-update operations, run by the engine loop between steps.

Every update follows one path: parse the layout, check every tensor against the model (meta-device
dry run) before reading or writing anything, stream ``(name, tensor)`` pairs into the model's
in-place ``load_weights``, then make the new version current. Because the loop runs control
operations between forward steps, no forward pass ever sees a mix of two versions.

If an update breaks after some tensors were written, the weights are marked invalid (generation is
refused with FAILED_PRECONDITION) until an update covering every parameter succeeds.

Tensors named ``draft.<name>`` are the draft model's (speculative method "draft"): checked and written
in the same pass, into the draft model (``control/draft_weights.py``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rollout.control.draft_weights import (
    DRAFT_PREFIX,
    DraftWeights,
    iter_update_checkpoint,
    no_draft_model,
    route,
    split_specs,
    update_checkpoint_specs,
)
from rollout.control.gate import Blocker
from rollout.control.update_calls import UpdateInCalls
from rollout.control.weight_checks import UpdateChecker
from rollout.control.weight_sources import OpenedSources, check_sources
from rollout.engine.jobs import Background
from rollout.engine.messages import (
    InitWeightGroup,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
)
from rollout.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, RolloutError, quoted
from weight_sync.buckets import BucketLayout, LayoutCache, WireLayout, bucket_views
from weight_sync.group import VOTE_GO, VOTE_REJECT, CommGroup, GroupConfig, GroupFailedError
from weight_sync.receiver import receive_buckets
from weight_sync.sources import CudaIpcSource, SharedMemorySource

if TYPE_CHECKING:
    from rollout.config import ModelConfig
    from rollout.control.gate import GenerationGate
    from rollout.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
# A received bucket may carry alignment padding, but not enough to make the engine allocate much
# more than the tensors themselves.
MAX_PADDING_PER_TENSOR = 4096
# Versions travel as int64 (protos/rollout.proto): the largest an update can make current.
MAX_VERSION = 2**63 - 1


class VersionOwner(Protocol):
    """Who owns the weight version (the scheduler on rank 0; a rank's own record on the others)."""

    weight_version: int

    def new_weights(self, version: int) -> None: ...

    def new_kv_epoch(self) -> None: ...


def rejected_elsewhere(group_name: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"the update was cancelled: another member of group {quoted(group_name)} rejected it; nothing was written")


class WeightUpdater:
    """Owns the weight-update groups of one engine rank and applies updates to its model shard."""

    def __init__(self, model_config: ModelConfig, runner: ModelRunner, scheduler: VersionOwner,
                 gate: GenerationGate, draft: DraftWeights | None = None, follower: bool = False) -> None:
        self._runner = runner
        self.draft = draft  # where ``draft.`` tensors go (None: no draft model, such names are refused)
        self._scheduler = scheduler  # owns the weight version; told of every write
        self._gate = gate
        self._checker = UpdateChecker(model_config, runner.dtype)
        self._groups: dict[str, CommGroup] = {}
        self._joining: set[str] = set()  # names of groups whose join runs beside the loop
        self._layout_cache = LayoutCache()
        self._calls = UpdateInCalls(follower)  # an update sent in several calls, until its last one

    @property
    def group_names(self) -> list[str]:
        """Names of the groups this engine belongs to."""
        return sorted(self._groups)

    # ------------------------------------------------------------------ groups
    def init_group(self, cmd: InitWeightGroup) -> Background:
        """Join a trainer's group as rank ``rank_offset`` (plus this engine rank's index: an engine of
        ``tp_size`` ranks takes ``rank_offset .. rank_offset + tp_size - 1``); the reply (the group's
        name) comes once the group has formed, and generation goes on while the join waits."""
        name = cmd.group_name
        if name in self._groups:
            raise FailedPreconditionError(f"group {quoted(name)} exists already; destroy it first")
        tp = self._runner.tp
        last = cmd.rank_offset + tp.size - 1 if isinstance(cmd.rank_offset, int) else None
        if tp.size > 1 and isinstance(cmd.world_size, int) and last is not None and last >= cmd.world_size:
            raise InvalidArgumentError(
                f"this engine has {tp.size} ranks, which need group ranks {cmd.rank_offset}..{last}, "
                f"but world_size is {cmd.world_size}", field="world_size")
        cfg = GroupConfig(
            master_address=cmd.master_address, master_port=cmd.master_port,
            rank=cmd.rank_offset + tp.rank if isinstance(cmd.rank_offset, int) else cmd.rank_offset,
            world_size=cmd.world_size, group_name=name, backend=cmd.backend,
            timeout_s=DEFAULT_TIMEOUT_S if cmd.timeout_s is None else cmd.timeout_s,
        )
        if cfg.rank == 0:
            raise InvalidArgumentError("rank 0 is the trainer's; engine ranks start at 1", field="rank_offset")
        if cfg.group_name in self._joining:
            raise FailedPreconditionError(f"group {quoted(cfg.group_name)} is still forming; wait for that join")
        runner_device = self._runner.device
        device = runner_device if cfg.backend == "nccl" else torch.device("cpu")
        self._joining.add(cfg.group_name)

        def joined(group: CommGroup) -> str:
            self._joining.discard(cfg.group_name)
            self._groups[cfg.group_name] = group
            logger.info("joined weight group %s as rank %d of %d (%s)", cfg.group_name, cfg.rank, cfg.world_size,
                        cfg.backend)
            return cfg.group_name

        def failed(error: BaseException) -> None:
            self._joining.discard(cfg.group_name)

        def abandoned(fut: concurrent.futures.Future) -> None:
            fut.add_done_callback(lambda f: f.exception() is None and f.result().close())

        # The join waits for the trainer; the loop keeps generating meanwhile and replies when it ends.
        return Background(work=lambda: CommGroup.join(cfg, device, survive_peer_failure=True), finish=joined,
                          fail=failed, abandon=abandoned)

    def _not_found(self, name: Any) -> RolloutError:
        if name in self._joining:
            return FailedPreconditionError(f"group {quoted(name)} is still forming; wait for its join to return")
        return NotFoundError(f"no weight group {quoted(name)}; groups: {self.group_names}", field="group_name")

    def destroy_group(self, name: str) -> str:
        """Leave and destroy the group ``name`` (NOT_FOUND if there is none)."""
        group = self._groups.pop(name, None)
        if group is None:
            raise self._not_found(name)
        group.close()
        return name

    def drop_group(self, name: str) -> None:
        """Leave the group ``name`` if this rank belongs to it (nothing otherwise)."""
        group = self._groups.pop(name, None)
        if group is not None:
            group.close()

    def drop_group_if_broken(self, name: str) -> None:
        """Leave the group ``name`` if a failed collective broke it (a failed receive beside the loop)."""
        group = self._groups.get(name)
        if group is not None and (group.broken or group.closed):
            self.drop_group(name)

    # ------------------------------------------------------------------ updates
    def from_distributed(self, cmd: UpdateWeightsFromDistributed) -> int:
        """Receive the trainer's broadcast buckets over a group and load them in place."""
        name = cmd.group_name
        group = self.group(name)
        problem: RolloutError | None = None
        try:
            layouts, version, _ = self.distributed_layouts(cmd)
            total = self._check(layouts)
        except RolloutError as e:
            problem = e
        # Every member votes before any bucket moves, so a rejected update leaves the group usable.
        try:
            verdict = group.vote(VOTE_REJECT if problem else VOTE_GO)
        except GroupFailedError as e:
            self.drop_group(name)
            raise FailedPreconditionError(f"{e.message}; the group was destroyed, form a new one") from None
        if problem is not None:
            raise problem
        if verdict == VOTE_REJECT:
            raise rejected_elsewhere(name)
        try:
            return self._apply(f"receiving over group {quoted(name)}", receive_buckets(group, layouts), total, version)
        except BaseException as e:
            # Whatever broke, this member's collectives are out of step with the others now.
            group.abort(f"an engine failed to take the update: {type(e).__name__}: {e}")
            self.drop_group(name)
            raise

    def group(self, name: str) -> CommGroup:
        """The formed group ``name`` (NOT_FOUND, or FAILED_PRECONDITION while it is still forming)."""
        group = self._groups.get(name)
        if group is None:
            raise self._not_found(name)
        return group

    def apply(self, cmd: UpdateWeightsFromDistributed | UpdateWeightsFromTensor | UpdateWeightsFromDisk) -> int:
        """Run the update ``cmd`` in place (between steps: the pausing path)."""
        if self._calls.open and not isinstance(cmd, UpdateWeightsFromTensor):
            self._abandon(f"{type(cmd).__name__} came before its last call")
        if isinstance(cmd, UpdateWeightsFromDistributed):
            return self.from_distributed(cmd)
        if isinstance(cmd, UpdateWeightsFromTensor):
            return self.from_tensor(cmd)
        return self.from_disk(cmd)

    def distributed_layouts(self, cmd: UpdateWeightsFromDistributed) -> tuple[list[BucketLayout], int, frozenset[str]]:
        """The buckets of a push, its version and the parameters it covers completely (all checked)."""
        self._calls.check_swap(cmd)
        layouts = self._layouts(cmd.layout)
        version = self._version(cmd.version)
        for i, layout in enumerate(layouts):
            if layout.nbytes - layout.payload_bytes > MAX_PADDING_PER_TENSOR * max(len(layout.tensors), 1):
                raise InvalidArgumentError(f"bucket {i} is mostly padding ({layout.nbytes} bytes)", field="offsets")
        return layouts, version, self.covered(layouts)

    def tensor_sources(self, cmd: UpdateWeightsFromTensor) -> tuple[list[BucketLayout], list[Any], int,
                                                                     frozenset[str]]:
        """The buckets and sources of a colocated update, its version and the parameters it covers."""
        self._calls.check_swap(cmd)
        layouts = self._layouts(cmd.layout)
        version = self._version(cmd.version)
        sources = list(cmd.sources)
        if not all(isinstance(s, (CudaIpcSource, SharedMemorySource)) for s in sources):
            raise InvalidArgumentError("each source must be a CUDA IPC or shared-memory source", field="sources")
        check_sources(sources, layouts, self._runner.device)
        return layouts, sources, version, self.covered(layouts)

    def disk_specs(self, cmd: UpdateWeightsFromDisk) -> tuple[str, int, int, frozenset[str]]:
        """A checkpoint update's directory, version, tensor count and the parameters it covers."""
        path = cmd.model_path
        if not isinstance(path, str) or not os.path.isdir(path):
            raise InvalidArgumentError(f"not a directory: {quoted(path)}", field="model_path")
        self._calls.check_swap(cmd)
        version = self._version(cmd.version)
        specs = update_checkpoint_specs(path)
        return path, version, len(specs), self.check(specs)

    def covered(self, layouts: list[BucketLayout]) -> frozenset[str]:
        """Check every tensor of ``layouts`` against the model; the parameters they fill completely."""
        return self.check([(t.name, t.torch_dtype, t.shape) for lay in layouts for t in lay.tensors])

    def check(self, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> frozenset[str]:
        """Check every ``(name, dtype, shape)``, the draft's (``draft.``) included, before anything is
        written; the target parameters they fill completely."""
        target, draft = split_specs(specs)
        if draft:
            if self.draft is None:
                raise no_draft_model(next(n for n, _, _ in specs if n.startswith(DRAFT_PREFIX)))
            self.draft.check(draft)
        return self._checker.check(target)

    def mark_loaded(self, written: set[str], version: int, what: str, total: int, draft: bool = False) -> int:
        """After a complete write of ``written`` (and of draft tensors if ``draft``): clear an earlier
        invalid state if it covers every parameter, and make ``version`` current (new KV epoch)."""
        if written >= self._checker.param_names:
            self._gate.clear(Blocker.WEIGHTS_INVALID)
        self._scheduler.new_weights(version)
        if draft and self.draft is not None:
            self.draft.loaded(version)
        logger.info("weights updated to version %d (%s, %d tensors)", version, what, total)
        return version

    def from_tensor(self, cmd: UpdateWeightsFromTensor) -> int:
        """Load tensors a colocated trainer shares by CUDA IPC handle or shared-memory segment; one
        call of several with ``cmd.more`` (``control/update_calls.py``)."""
        try:
            cmd = dataclasses.replace(cmd, version=self._calls.version_of(cmd.version, self._gate))
            layouts, sources, version, _ = self.tensor_sources(cmd)
            total = sum(len(lay.tensors) for lay in layouts)
            with OpenedSources(sources, layouts, self._runner.device) as buffers:
                named = itertools.chain.from_iterable(bucket_views(lay, buf) for lay, buf in zip(layouts, buffers))
                return self._apply("reading shared tensors", named, total, version, more=cmd.more)
        except Exception as e:
            if not self._calls.open:
                raise
            cause = e.message if isinstance(e, RolloutError) else f"{type(e).__name__}: {e}"
            raise FailedPreconditionError(self._abandon(f"a call failed: {cause}")) from e

    def forget_open_update(self) -> None:
        """Forget an open update in calls, so its calls' writes count toward no full update: the ranks
        diverged on one of them, and only an update covering every parameter on every rank heals."""
        if self._calls.open:
            self._calls.close()
            self._gate.clear(Blocker.WEIGHTS_UPDATING)

    def _abandon(self, why: str) -> str:
        """The open update in calls stops short (``UpdateInCalls.abandon``); the caller's message."""
        msg = self._calls.abandon(why, self._gate)
        self._scheduler.new_kv_epoch()  # the weights changed: no prefix computed before is valid
        logger.error(msg)
        return msg

    def from_disk(self, cmd: UpdateWeightsFromDisk) -> int:
        """Reload weights from a safetensors checkpoint directory."""
        path, version, total, _ = self.disk_specs(cmd)
        return self._apply(f"loading {path}", iter_update_checkpoint(path), total, version)

    # ------------------------------------------------------------------ shared steps
    def _version(self, version: Any) -> int:
        """The version an update makes current: ``version``, or (None) the current one + 1. Versions
        travel as int64 on the wire, so none past ``MAX_VERSION`` is taken."""
        if version is None:
            version = self._scheduler.weight_version + 1
            if version > MAX_VERSION:
                raise InvalidArgumentError(f"the next version would pass {MAX_VERSION}; give one explicitly",
                                           field="version")
            return version
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_VERSION:
            raise InvalidArgumentError(f"must be an integer in [0, {MAX_VERSION}], got {quoted(version)}",
                                       field="version")
        return version

    def _layouts(self, wire: WireLayout) -> list[BucketLayout]:
        return self._layout_cache.get(wire)

    def _check(self, layouts: list[BucketLayout]) -> int:
        """Validate every tensor against the model; returns how many tensors the update has."""
        self.covered(layouts)
        return sum(len(lay.tensors) for lay in layouts)

    def _apply(self, what: str, named: Iterable[tuple[str, torch.Tensor]], total: int, version: int,
               more: bool = False) -> int:
        """Stream ``named`` into the model in place (``draft.`` tensors into the draft model, in the
        same pass); on success make ``version`` current.

        Raises ``FailedPreconditionError`` (and marks the weights invalid) if it fails after a target
        tensor was handed to the loader; earlier failures leave the weights as they were (but for
        draft tensors written already: the draft then counts as stale).
        """
        handed = drafted = 0
        draft = self.draft.writer() if self.draft is not None else None

        def counted(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal handed
            for item in items:
                handed += 1
                yield item

        def put(name: str, tensor: torch.Tensor) -> None:
            nonlocal drafted
            assert draft is not None
            drafted += 1
            draft.write(name, tensor)

        runner = self._runner
        try:
            # The calls of one update count their shards together (``UpdateInCalls.coverage``); a
            # first call starts afresh (one that failed before left its shards behind).
            if not self._calls.open:
                self._calls.coverage = {}
            coverage = self._calls.coverage if more or self._calls.open else None
            written = runner.model.load_weights(counted(route(named, put if draft is not None else None)), coverage)
            if draft is not None:
                draft.finish()
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)  # device-side failures surface here
        except Exception as e:
            cause = e.message if isinstance(e, RolloutError) else f"{type(e).__name__}: {e}"
            if drafted and self.draft is not None:
                self.draft.spoiled()
            if handed == 0 and drafted:
                raise FailedPreconditionError(
                    f"{what} failed after {drafted} draft model tensors were written: {cause}; the target's "
                    "weights are unchanged, the draft model counts as stale until a push carries its weights") from e
            if handed == 0:
                if isinstance(e, RolloutError):
                    raise
                raise FailedPreconditionError(f"{what} failed before any weight was written: {cause}") from e
            msg = (f"the weights are invalid after a failed update ({what}: {cause}; {handed + drafted} of {total} "
                   "tensors were written); push a full set of weights")
            self._gate.block(Blocker.WEIGHTS_INVALID, msg)
            self._scheduler.new_kv_epoch()  # the weights changed: no prefix computed before is valid
            logger.error(msg)
            raise FailedPreconditionError(msg) from e
        if more:  # generation waits for the update's last call
            self._calls.add(version, set(written), drafted > 0)
            self._gate.block(Blocker.WEIGHTS_UPDATING,
                             f"a weight update sent in several calls (version {version}) waits for its last call "
                             "(or for any full update, if its sender is gone)")
            return version
        if self._calls.open:
            earlier, _, drafted_before = self._calls.close()
            written = set(written) | earlier
            drafted += drafted_before
            self._gate.clear(Blocker.WEIGHTS_UPDATING)
        return self.mark_loaded(written, version, what, total, draft=drafted > 0)
