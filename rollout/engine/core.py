"""EngineCore: the synchronous engine (scheduler + KV cache + model runner) driven step by step.

It is single-threaded by design: the engine loop (``loop.py``) owns it and feeds it commands
between steps; nothing else touches it. Control commands (``messages.py``, one dataclass each) are
dispatched by one ``match`` in ``handle``: pause modes to the scheduler, weight updates to
``control.weights``, memory to ``control.memory``. What blocks generation is in one ``GenerationGate``.
"""

from __future__ import annotations

import gc
import logging
import random
import traceback
from typing import Any

from rollout import __version__
from rollout.batch import BatchPlan
from rollout.cache.manager import KVCacheManager
from rollout.config import EngineConfig
from rollout.control.draft_weights import DraftWeights
from rollout.control.experts import ExpertBalancer
from rollout.control.gate import Blocker, GenerationGate
from rollout.control.memory import MemoryControl
from rollout.control.weight_swap import WeightSwap
from rollout.control.weights import WeightUpdater
from rollout.distributed.tp import SINGLE, TPGroup
from rollout.engine.messages import (
    AddRequest,
    CheckIntegrity,
    Continue,
    ControlCommand,
    DestroyWeightGroup,
    Event,
    FlushCache,
    GetInfo,
    InitWeightGroup,
    Pause,
    RebalanceExperts,
    ReleaseMemory,
    RequestFailed,
    ResumeMemory,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
)
from rollout.engine.rank_control import RankControl
from rollout.engine.ranks import Followers
from rollout.engine.request_validation import RequestLimits
from rollout.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError, quoted
from rollout.runner.model_runner import ModelRunner, QueuedStep
from rollout.scheduler.routed_rows import RoutedRows
from rollout.scheduler.scheduler import Scheduler
from rollout.scheduler.sequence import SeqStatus, Sequence
from rollout.scheduler.stop import StopChecker
from rollout.spec.speculator import Speculator
from rollout.tokenizer import Tokenizer
from rollout.types import EngineInfo, StreamChunk, parse_pause_mode

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns every engine component; ``step()`` runs one batch and returns the events it produced."""

    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, followers: Followers | None = None) -> None:
        # tp / followers: with tensor-parallel ranks this core is rank 0; the other ranks run the
        # steps it sends them (``rollout.engine.follower``).
        self.config = config
        self.tokenizer = Tokenizer.from_model_dir(config.model_path)
        self.runner = ModelRunner(config, tp)
        self.cache = self._build_cache()
        self.followers = followers
        self.broken: str | None = None  # why a multi-rank engine cannot go on (the loop then ends)
        self._steps_since_rebalance = 0
        if followers is not None:
            self.cache.req_table.journal = []  # the other ranks' copies of the table follow this one
        self.runner.prepare(self.cache.req_table)
        eos = config.model.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.stop = StopChecker(tuple(eos), config.context_length, self.tokenizer)
        self.scheduler = Scheduler(config.scheduler, self.cache, self.stop)
        self.scheduler.on_finish = self._on_finish
        self.gate = GenerationGate()
        spec = Speculator(config, self.runner, self.scheduler.weight_version) if config.spec.method else None
        self.spec = spec
        draft = DraftWeights(spec.draft) if spec is not None and spec.draft is not None else None
        self.weights = WeightUpdater(config.model, self.runner, self.scheduler, self.gate, draft)
        self.swap = WeightSwap(self.weights, self.runner, self.scheduler)
        self.memory = MemoryControl(self.runner.memory, self.scheduler, self.runner, self.gate, spec and spec.draft)
        self.memory.on_weights_lost = self.weights.forget_open_update
        self.ranks = RankControl(followers, self.weights, self.memory, self.gate, self.scheduler,
                                 ExpertBalancer(self.runner.model))
        self._rng = random.Random(config.seed)
        self._next_uid = 0
        self._events: list[Event] = []
        self._live: dict[str, int] = {}  # request id -> samples not yet finished
        # The launched step whose tokens are not collected yet (overlap scheduling).
        self._queued: tuple[BatchPlan, list[Sequence], QueuedStep] | None = None
        # A full garbage collection walks every tracked object of the process (torch, triton and the
        # model bring millions): 100+ ms stalls in the middle of decoding. What exists now lives as
        # long as the engine, so it is moved out of the collector's sight until close().
        gc.collect()
        gc.freeze()

    @property
    def weight_version(self) -> int:
        """The version of the weights being served (owned by the scheduler, which stamps each step)."""
        return self.scheduler.weight_version

    @property
    def weights_valid(self) -> bool:
        return not self.gate.blocks(Blocker.WEIGHTS_INVALID)

    def _build_cache(self) -> KVCacheManager:
        cfg = self.config
        return KVCacheManager(
            num_slots=self.runner.num_slots,
            page_size=cfg.cache.page_size,
            max_requests=cfg.request_table_shape[0],
            max_context=cfg.request_table_shape[1],
            device=self.runner.device,
            enable_prefix_cache=cfg.cache.enable_prefix_cache,
        )

    @property
    def limits(self) -> RequestLimits:
        m = self.config.model
        return RequestLimits(vocab_size=m.vocab_size, context_length=self.config.context_length,
                             max_total_tokens=self.cache.total_slots,
                             eos_token_ids=tuple(sorted(self.stop.eos_token_ids)), num_moe_layers=len(m.moe_layer_ids),
                             routed_experts=self.config.enable_return_routed_experts)

    # ------------------------------------------------------------------ requests
    def add(self, req: AddRequest) -> None:
        """Queue the ``n`` samples of one prompt. Raises a typed error if it cannot be taken."""
        if req.request_id in self._live:
            raise InvalidArgumentError(f"request id {quoted(req.request_id)} is already in use", field="request_id")
        cap = self.config.scheduler.max_queued_requests
        if req.sampling.n > cap:  # no retry could ever fit it
            raise InvalidArgumentError(f"n = {req.sampling.n} samples exceed the queue ({cap}, max_queued_requests)",
                                       field="n")
        if self.scheduler.num_queued + req.sampling.n > cap:
            raise ResourceExhaustedError("the request queue is full; retry later")
        if self.gate.closed:
            raise FailedPreconditionError("generation is refused: " + self.gate.reason())
        key = hash(tuple(req.input_ids))
        seqs = []
        for i in range(req.sampling.n):
            seed = req.sampling.seed + i if req.sampling.seed is not None else self._rng.getrandbits(63)
            self._next_uid += 1
            seqs.append(Sequence(
                uid=self._next_uid, request_id=req.request_id, index=i, prompt_ids=list(req.input_ids),
                sampling=req.sampling, seed=seed, prompt_key=key, arrival=0,
                return_logprob=req.return_logprob, return_raw_logprob=req.return_raw_logprob,
                top_logprobs_num=req.top_logprobs_num, stream=req.stream, routing=self._routed_rows(req),
            ))
        self._live[req.request_id] = req.sampling.n
        try:
            self.scheduler.add(seqs)
        except Exception:
            del self._live[req.request_id]  # its id stays free for a retry
            raise

    def _routed_rows(self, req: AddRequest) -> RoutedRows | None:
        """Where one sample of ``req`` gathers its routed experts (None when the request did not ask)."""
        if not req.return_routed_experts:
            return None
        m = self.config.model
        return RoutedRows(len(req.input_ids), (len(m.moe_layer_ids), m.num_experts_per_tok))

    def abort(self, request_ids: list[str] | None) -> None:
        self.scheduler.abort(None if request_ids is None else set(request_ids))

    def has_work(self) -> bool:
        return self._queued is not None or (not self.gate.closed and self.scheduler.has_work())

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[Event]:
        """Run one batch (if any) and return every event produced since the last call.

        With overlap scheduling the batch is launched and the previous one's tokens are collected
        while it runs; otherwise the batch runs to completion here.
        """
        try:
            self._rebalance_when_due()
            if self.spec is not None and not self.gate.closed:
                running, waiting = self.scheduler.running, self.scheduler.num_queued
                if self._queued is not None and self.spec.wants_quiet(running, waiting):
                    self.drain()  # drafting needs every last token on the host
                self.spec.propose(running, self.cache.available_tokens(), self.scheduler.weight_version, waiting)
            picked = self.scheduler.schedule() if not self.gate.closed else None
            queued = None
            if picked is not None and picked[0].spec is not None:
                self._speculative_step(*picked)
                picked = None
            if picked is not None:
                plan, seqs = picked
                if self.followers is not None:
                    self.followers.step(plan, self.cache.req_table.take_journal())
                queued = (plan, seqs, self.runner.launch(plan))
                self.scheduler.launched(plan, seqs)
            previous, self._queued = self._queued, queued
            if previous is not None:
                self._collect(previous)
            if not self.config.scheduler.overlap_schedule:
                self.drain()
        except Exception as exc:  # a bug or device failure: fail the batch, keep serving
            logger.error("forward step failed:\n%s", traceback.format_exc())
            self.fail_step(exc)
        return self.take_events()

    def _rebalance_when_due(self) -> None:
        """Every ``ep_rebalance_interval`` steps, place the experts by the tokens counted since the last
        time (between two steps, like a rebalance on request; outputs do not change)."""
        every = self.config.parallel.ep_rebalance_interval
        # The shadow was filled under the current placement; released weights cannot be moved.
        if not every or self.swap.busy or not self.memory.weights_mapped:
            return
        self._steps_since_rebalance += 1
        if self._steps_since_rebalance < every:
            return
        self._steps_since_rebalance = 0
        self.drain()
        report = self.ranks.rebalance(RebalanceExperts())
        logger.info("experts rebalanced: balancedness %.3f -> %.3f, %d copies moved",
                    report["balancedness_before"], report["balancedness_after"], report["moved"])
    def _speculative_step(self, plan: BatchPlan, seqs: list[Sequence]) -> None:
        """Run a step with drafts to completion: the next plan depends on how many were accepted."""
        assert self.spec is not None and self._queued is None
        result, accepted = self.spec.run(plan, seqs)
        self.scheduler.launched(plan, seqs)
        for seq in self.scheduler.collect(plan, seqs, result, accepted):
            if seq.stream and seq.status is SeqStatus.RUNNING:
                self._events.append(self._chunk(seq))

    def drain(self) -> None:
        """Collect the step still running, if any (before anything that needs a quiet engine)."""
        queued, self._queued = self._queued, None
        if queued is None:
            return
        try:
            self._collect(queued)
        except Exception as exc:
            logger.error("forward step failed:\n%s", traceback.format_exc())
            self.fail_step(exc)

    def _collect(self, queued: tuple[BatchPlan, list[Sequence], QueuedStep]) -> None:
        plan, seqs, step = queued
        result = self.runner.collect(step)
        for seq in self.scheduler.collect(plan, seqs, result):
            if seq.stream and seq.status is SeqStatus.RUNNING:
                self._events.append(self._chunk(seq))

    def fail_step(self, exc: BaseException) -> None:
        """Drop the step in flight and fail the running requests. With several ranks the engine is
        broken too: the other ranks ran (or wait in) a step this one did not finish, so no later step
        could be trusted."""
        self._queued = None
        why = f"{type(exc).__name__}: {exc}"
        if self.followers is None:
            self._fail_running(f"the engine step failed: {why}", "INTERNAL")
            return
        self.broken = f"the engine's ranks fell out of step (an engine rank died or failed: {why}); the engine stops"
        self._fail_running(self.broken, "UNAVAILABLE")

    def _fail_running(self, message: str, code: str) -> None:
        """Fail every request the failed step held (a running sample, or a queued one owed a token by
        it): their KV state is unknown (``Scheduler.drop_running``)."""
        for rid in self.scheduler.drop_running():
            self._live.pop(rid, None)
            self._events.append(RequestFailed(rid, code, message))

    def _chunk(self, seq: Sequence, final: bool = False) -> StreamChunk:
        a, b = seq.emitted, len(seq.output_ids)
        seq.emitted = b
        chunk = StreamChunk(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=seq.output_ids[a:b],
            logprobs=seq.logprobs[a:b] if seq.return_logprob else None,
            raw_logprobs=seq.raw_logprobs[a:b] if seq.return_raw_logprob else None,
            top_logprobs=seq.top_logprobs[a:b] if seq.top_logprobs_num else None,
            weight_versions=seq.weight_versions[a:b],
        )
        if seq.routing is not None:
            chunk.routed_experts, chunk.prompt_routed_experts = seq.routing.for_chunk(a, b, final)
        if final:
            chunk.finished = True
            chunk.finish_reason = seq.finish_reason
            chunk.matched_stop = seq.matched_stop
            chunk.prompt_tokens = len(seq.prompt_ids)
            chunk.completion_tokens = len(seq.output_ids)
            chunk.cached_tokens = max(seq.cached_tokens, 0)
        return chunk

    def _on_finish(self, seq: Sequence) -> None:
        self._events.append(self._chunk(seq, final=True))
        left = self._live.get(seq.request_id, 1) - 1
        if left <= 0:
            self._live.pop(seq.request_id, None)
        else:
            self._live[seq.request_id] = left

    # ------------------------------------------------------------------ control
    def handle(self, cmd: ControlCommand) -> Any:
        """Apply one control command between steps; returns its result (or a ``Background`` whose
        result the loop replies with later). Raises a typed error for the caller."""
        match cmd:
            case Pause(mode=mode):
                self.scheduler.pause(parse_pause_mode(mode))
            case Continue():
                self.scheduler.resume()
            case FlushCache():
                self.scheduler.flush_prefix_cache()
            case GetInfo():
                return self.info()
            case CheckIntegrity():
                self.cache.check_integrity()
            case InitWeightGroup():
                return self.ranks.init_group(cmd)
            case DestroyWeightGroup():
                # A swap's receives run beside the loop on a group; closing it here would block the
                # loop until the collective timed out.
                self.swap.check_idle("destroying a weight group")
                return self.ranks.destroy_group(cmd)
            case UpdateWeightsFromDistributed() | UpdateWeightsFromTensor() | UpdateWeightsFromDisk():
                self.memory.check_weights_writable()
                if cmd.swap:  # received beside the loop; switched between two steps
                    return self.ranks.swap_weights(cmd, self.swap, self.drain)
                self.swap.check_idle("an update without swap")
                return self.ranks.update_weights(cmd, lambda: self.weights.apply(cmd))
            case RebalanceExperts():
                self.memory.check_weights_writable("moving experts")
                self.swap.check_idle("moving experts")
                return self.ranks.rebalance(cmd)
            case ReleaseMemory():
                self.swap.check_idle("releasing memory")
                return self.ranks.release(cmd)
            case ResumeMemory():
                self.swap.check_idle("resuming memory")
                return self.ranks.resume(cmd)
            case _:
                raise InvalidArgumentError(f"unknown control command {type(cmd).__name__}", field="command")
        return None

    def info(self) -> EngineInfo:
        cfg = self.config
        sch = self.scheduler
        info = EngineInfo(
            model_path=cfg.model_path,
            architecture=cfg.model.architecture,
            context_length=cfg.context_length,
            vocab_size=cfg.model.vocab_size,
            weight_version=self.weight_version,
            weights_valid=self.weights_valid,
            paused=sch.paused is not None,
            pause_mode=sch.paused.value if sch.paused is not None else None,
            num_waiting=len(sch.waiting),
            num_running=sum(1 for s in sch.running),
            num_paused=len(sch.running) if sch.paused is not None else 0,
            kv_total_tokens=self.cache.total_slots,
            kv_used_tokens=self.cache.used_tokens(),
            kv_cached_tokens=self.cache.cached_tokens(),
            page_size=cfg.cache.page_size,
            num_retractions=sch.num_retractions,
            device=cfg.device,
            dtype=cfg.dtype,
            version=__version__,
            deterministic=cfg.deterministic,
        )
        info.memory = self.memory.states()
        info.tp_size = self.ranks.size
        info.rank_memory = self.ranks.rank_memory()
        if self.spec is not None:
            policy = self.spec.policy
            info.spec_drafted, info.spec_accepted, info.spec_verified = policy.drafted, policy.accepted, policy.verified
        return info

    def shutdown(self) -> None:
        """End every request with reason abort."""
        self.scheduler.paused = None
        self.scheduler.abort(None)

    def close(self) -> None:
        """Free the device memory of weights, KV and graphs (after ``shutdown``; the core is dead after)."""
        if self.followers is not None:
            try:
                self.followers.stop()
            except Exception:  # a broken world: the launcher stops the other ranks
                logger.exception("could not tell the other engine ranks to stop")
        if self.spec is not None:
            self.spec.close()
        self.runner.close()
        gc.unfreeze()  # what the engine held may be garbage now: let the collector see it again

