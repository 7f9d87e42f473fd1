"""Zero-pause (swap-mode) weight updates on CPU: the engine receives into shadow weights while it keeps
generating, and switches between two steps.

The trainer's broadcast is held open by a hook on its ``CommGroup.broadcast`` (it runs after the
status vote, so the engine is inside its receive then): generation must go on meanwhile. The greedy
oracle is transformers on the perturbed checkpoint, as in ``test_weight_sync``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

import weight_sync
from memory_saver import CudaDriverError
from rollout import Engine, SamplingParams
from rollout.config import ModelConfig
from rollout.control.gate import Blocker, GenerationGate
from rollout.control.memory_placement import EngineMemory
from rollout.control.weight_swap import NoRoom
from rollout.engine.jobs import Background
from rollout.engine.messages import UpdateWeightsFromDisk
from rollout.engine.rank_control import RankControl
from rollout.engine.ranks import RankReport
from rollout.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from rollout.types import SwapResult
from tests.hf_oracle import hf_greedy
from tests.unit.test_weight_sync import BUCKET, GREEDY, MAX_NEW, PROMPTS, expected, model_dir, outputs, perturbed  # noqa: F401
from weight_sync.group import GroupFailedError

STREAMS = 32
LONG = SamplingParams(temperature=0.0, max_new_tokens=1000, ignore_eos=True)
OPTS = dict(max_total_tokens=40000)
WAIT_S = 20.0  # a stall fails within this, instead of hanging the suite


class Streams:
    """``n`` long greedy streams, each read by a thread of its own: tokens and versions as they come."""

    def __init__(self, engine: Engine, n: int) -> None:
        self.prompts = [[100 + i, 7, 8, 9] for i in range(n)]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.versions: list[list[int]] = [[] for _ in range(n)]
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._read, args=(engine, i), daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _read(self, engine: Engine, i: int) -> None:
        try:
            for chunk in engine.stream(self.prompts[i], LONG, request_id=f"stream-{i}"):
                self.versions[i] += chunk.weight_versions
                self.tokens[i] += chunk.token_ids
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.errors.append(e)

    def counts(self) -> list[int]:
        return [len(v) for v in self.versions]

    def advance(self, since: list[int], k: int) -> bool:
        """Wait until every stream has ``k`` tokens more than ``since``; False if one stalls."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if all(now >= then + k for now, then in zip(self.counts(), since)):
                return True
            time.sleep(0.005)
        return False

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=WAIT_S)
        assert not self.errors, self.errors


class HeldBroadcast:
    """Holds the trainer's first broadcast (after the status vote) until ``release``; optionally
    breaks the push at broadcast ``fail_at`` (the trainer crashing mid-transfer)."""

    def __init__(self, group: Any, fail_at: int | None = None) -> None:
        self.voted = threading.Event()
        self._go = threading.Event()
        self._calls = 0
        self._real = group.comm.broadcast
        self._fail_at = fail_at
        group.comm.broadcast = self

    def __call__(self, tensor: Any, src: int = 0) -> Any:
        self._calls += 1
        self.voted.set()
        self._go.wait(WAIT_S)
        if self._calls == self._fail_at:
            raise RuntimeError("the trainer crashed")
        return self._real(tensor, src)

    def release(self) -> None:
        self._go.set()


def test_swap_push_while_streams_generate(model_dir, perturbed, expected) -> None:
    weights, new_dir = perturbed
    with Engine(model_dir, **OPTS) as engine:
        assert outputs(engine) == expected["old"]  # these prompts' prefixes are cached under version 0
        group = weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60)
        streams = Streams(engine, STREAMS)
        assert streams.advance([0] * STREAMS, 1)
        held = HeldBroadcast(group)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            push = pool.submit(group.push, weights.items(), version=1, swap=True)
            assert held.voted.wait(WAIT_S)
            # The engine voted and waits for the buckets: every stream must keep generating meanwhile.
            during = streams.counts()
            assert streams.advance(during, 5), f"streams stalled during the transfer: {streams.counts()} vs {during}"
            assert not push.done()
            with pytest.raises(FailedPreconditionError, match="swap weight update is in progress"):
                engine.update_weights_from_disk(model_dir)
            # Closing the group under the receive would hold the loop until the collective timed out.
            with pytest.raises(FailedPreconditionError, match="destroying a weight group must wait"):
                engine.destroy_weight_update_group(group.group_name)
            held.release()
            assert push.result(timeout=WAIT_S) == SwapResult(1, swapped=True)
        after = streams.counts()
        assert streams.advance(after, 3)
        engine.abort()
        streams.join()
        group.close()
        for i, versions in enumerate(streams.versions):
            k = versions.index(1)  # the first token of the new weights
            assert k >= during[i] + 5 and k <= after[i] + 1
            assert versions == [0] * k + [1] * (len(versions) - k), f"stream {i} mixes versions: {versions}"
        # New requests never reuse KV computed under version 0, and continue any prefix as version 1 would.
        assert outputs(engine) == expected["new"]
        eos = ModelConfig.from_pretrained(new_dir).eos_token_ids
        k = streams.versions[0].index(1)
        prefix = streams.prompts[0] + streams.tokens[0][:k]
        assert engine.generate(prefix, GREEDY)[0].output_ids == hf_greedy(new_dir, prefix, MAX_NEW, eos)[0]
        info = engine.info()
        assert info.weight_version == 1 and info.weights_valid
        engine.check_integrity()


def test_a_broken_swap_push_leaves_the_old_weights_serving(model_dir, perturbed, expected) -> None:
    weights, _ = perturbed
    with Engine(model_dir, **OPTS) as engine:
        group = weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60)
        streams = Streams(engine, 4)
        held = HeldBroadcast(group, fail_at=2)  # bucket 0 arrives, then the trainer dies
        held.release()
        with pytest.raises(GroupFailedError) as failure:
            group.push(weights.items(), version=1, swap=True)
        assert "nothing was switched: version 0 keeps serving" in str(failure.value)
        info = engine.info()
        assert info.weights_valid and info.weight_version == 0
        assert streams.advance(streams.counts(), 3)  # generation never stopped
        engine.abort()
        streams.join()
        assert all(set(v) == {0} for v in streams.versions)
        assert outputs(engine) == expected["old"]
        with pytest.raises(NotFoundError):  # the broken group was left
            engine.destroy_weight_update_group(group.group_name)
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as again:
            bad = dict(weights)
            bad["model.norm.weight"] = bad["model.norm.weight"][:-1]
            with pytest.raises(InvalidArgumentError, match="model.norm.weight"):
                again.push(bad.items(), version=2, swap=True)
            assert engine.info().weight_version == 0
            assert again.push(weights.items(), version=3, swap=True) == SwapResult(3, swapped=True)
        assert outputs(engine) == expected["new"]
        engine.check_integrity()


def test_swap_without_room_for_the_shadow_takes_the_pausing_path(model_dir, perturbed, expected,
                                                                 monkeypatch) -> None:
    weights, new_dir = perturbed

    def no_room(self: EngineMemory) -> None:
        raise CudaDriverError("cuMemCreate", "CUDA_ERROR_OUT_OF_MEMORY")

    monkeypatch.setattr(EngineMemory, "shadow_weights_arena", no_room)
    with Engine(model_dir, **OPTS) as engine:
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            result = group.push(weights.items(), version=1, swap=True)
        assert result.weight_version == 1 and not result.swapped
        assert "no room for a shadow copy" in result.note and "pausing path" in result.note
        assert outputs(engine) == expected["new"]
        result = engine.update_weights_from_disk(model_dir, swap=True)
        assert result.weight_version == 2 and not result.swapped and "CUDA_ERROR_OUT_OF_MEMORY" in result.note
        assert outputs(engine) == expected["old"] and engine.info().weights_valid


def test_partial_swap_keeps_the_other_weights(model_dir, perturbed, expected) -> None:
    """A swap that rewrites some parameters, and parts of fused ones (q of qkv, gate of gate_up): the
    shadow starts as a copy of everything else."""
    weights, new_dir = perturbed
    some = [(n, t) for n, t in weights.items() if "q_proj" in n or "gate_proj" in n]

    def logprobs(engine: Engine) -> list[list[float]]:
        return [o.output_raw_logprobs for o in engine.generate(PROMPTS, GREEDY, return_raw_logprob=True)]

    with Engine(model_dir, **OPTS) as swapped, Engine(model_dir, **OPTS) as paused:
        old = logprobs(paused)
        assert weight_sync.push_tensors_shm([swapped], some, version=1, swap=True) == SwapResult(1, swapped=True)
        assert weight_sync.push_tensors_shm([paused], some, version=1) == 1
        mixed = logprobs(paused)
        assert mixed != old
        assert logprobs(swapped) == mixed
        assert swapped.update_weights_from_disk(new_dir, swap=True) == SwapResult(2, swapped=True)
        assert outputs(swapped) == expected["new"]


def test_every_rank_switches_together(model_dir, perturbed, expected) -> None:
    """Two tensor-parallel ranks: both receive into shadows and switch at the same step."""
    weights, _ = perturbed
    with Engine(model_dir, max_total_tokens=4096, tp_size=2) as engine:
        streams = Streams(engine, 4)
        assert streams.advance([0] * 4, 1)
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            assert group.comm.cfg.world_size == 3
            assert group.push(weights.items(), version=1, swap=True) == SwapResult(1, swapped=True)
        assert streams.advance(streams.counts(), 2)
        engine.abort()
        streams.join()
        for versions in streams.versions:
            k = versions.index(1)
            assert versions == [0] * k + [1] * (len(versions) - k)
        assert outputs(engine) == expected["new"]
        assert engine.update_weights_from_disk(model_dir, swap=True) == SwapResult(2, swapped=True)
        assert outputs(engine) == expected["old"]
        assert engine.info().weights_valid
        engine.check_integrity()


class _Followers:
    """Ranks 1 and 2 as rank 0 sees them: every command recorded, each answered with ``reports``."""

    size = 3

    def __init__(self, reports: list[RankReport]) -> None:
        self.reports = reports
        self.commands: list[Any] = []

    def control(self, command: Any) -> int:
        self.commands.append(command)
        return len(self.commands)

    def wait(self, op: int) -> list[RankReport]:
        return [replace(r, op=op) for r in self.reports]


class _Swap:
    """Rank 0's own swap, reduced to a log of what rank 0 asked of it."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def start(self, cmd: Any) -> Background:
        return Background(work=lambda: "ready", finish=lambda result: result)

    def drop(self) -> None:
        self.log.append("drop")

    def failed(self, cmd: Any, error: BaseException) -> None:
        self.log.append("failed")

    def switch(self) -> SwapResult:
        self.log.append("switch")
        return SwapResult(5, swapped=True)

    def fallback(self, cmd: Any, note: str) -> SwapResult:
        self.log.append("fallback")
        return SwapResult(5, swapped=False, note=note)


class _Versions:
    def new_kv_epoch(self) -> None:
        pass


def _swap_on_three_ranks(reports: list[RankReport]) -> tuple[Any, _Followers, _Swap, GenerationGate]:
    """Rank 0 runs a swap update with two other ranks answering ``reports``; returns its outcome."""
    followers, swap, gate = _Followers(reports), _Swap(), GenerationGate()
    control = RankControl(followers, None, None, gate, _Versions())  # type: ignore[arg-type]
    job = control.swap_weights(UpdateWeightsFromDisk("/ckpt", swap=True), swap, lambda: None)  # type: ignore[arg-type]
    try:
        outcome: Any = job.finish(job.work())
    except Exception as e:  # noqa: BLE001 - the test reads it
        outcome = e
    return outcome, followers, swap, gate


def test_rank_zero_switches_every_rank_or_none() -> None:
    ready = [RankReport(0, 1, result="ready"), RankReport(0, 2, result="ready")]
    result, followers, swap, gate = _swap_on_three_ranks(ready)
    assert result == SwapResult(5, swapped=True) and swap.log == ["switch"]
    assert [type(c).__name__ for c in followers.commands] == ["UpdateWeightsFromDisk", "SwitchShadow"]

    # One rank without room: every shadow is dropped and every rank takes the pausing path.
    no_room = [RankReport(0, 1, result="ready"), RankReport(0, 2, result=NoRoom("no room on rank 2"))]
    result, followers, swap, gate = _swap_on_three_ranks(no_room)
    assert result == SwapResult(5, swapped=False, note="no room on rank 2") and swap.log == ["drop", "fallback"]
    sent = followers.commands
    assert [type(c).__name__ for c in sent] == ["UpdateWeightsFromDisk", "DropShadow", "UpdateWeightsFromDisk"]
    assert sent[0].swap and not sent[2].swap

    # One rank failing its transfer: every shadow dropped, the error raised, version v serves on.
    failed = [RankReport(0, 1, result="ready"), RankReport(0, 2, error_code="FAILED_PRECONDITION",
                                                             error_message="disk read failed")]
    result, followers, swap, gate = _swap_on_three_ranks(failed)
    assert isinstance(result, FailedPreconditionError) and "engine rank 2: disk read failed" in str(result)
    assert swap.log == ["drop"] and type(followers.commands[-1]).__name__ == "DropShadow" and not gate.closed

    # The switch failing on one rank after the others switched: the ranks differ, so generation stops.
    class SwitchFails(_Followers):
        def wait(self, op: int) -> list[RankReport]:
            if type(self.commands[-1]).__name__ != "SwitchShadow":
                return super().wait(op)
            return [RankReport(op, 1), RankReport(op, 2, error_code="FAILED_PRECONDITION", error_message="map")]

    followers, swap, gate = SwitchFails(ready), _Swap(), GenerationGate()
    job = RankControl(followers, None, None, gate, _Versions()).swap_weights(  # type: ignore[arg-type]
        UpdateWeightsFromDisk("/ckpt", swap=True), swap, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(FailedPreconditionError, match="engine rank 2: map"):
        job.finish(job.work())
    assert gate.blocks(Blocker.WEIGHTS_INVALID) and "differ between engine ranks" in gate.reason()


def test_overlapping_receives_restore_the_thread_switch_interval() -> None:
    """Two receives that overlap (two engines of one process), the first ending first: short turns
    hold while either runs, and the interval from before the first comes back after both."""
    import sys
    import threading

    from rollout.control.weight_swap import SWAP_GIL_TURN_S, _with_short_gil_turns

    before = sys.getswitchinterval()
    started = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]

    def receive(i: int) -> None:
        started[i].set()
        release[i].wait(10)

    threads = [threading.Thread(target=_with_short_gil_turns, args=(lambda i=i: receive(i),)) for i in (0, 1)]
    for t, s in zip(threads, started):
        t.start()
        s.wait(10)
    release[0].set()
    threads[0].join(10)
    assert sys.getswitchinterval() == SWAP_GIL_TURN_S  # the second receive still runs
    release[1].set()
    threads[1].join(10)
    assert sys.getswitchinterval() == before
