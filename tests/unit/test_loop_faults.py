"""The engine loop outlives faults outside a step's forward, keeps stepping under a flood of
commands, and fails calls made after it was shut down instead of leaving them waiting."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import torch

import rollout.scheduler.scheduler as sched
from rollout import Engine, SamplingParams
from rollout.engine.loop import MAX_COMMANDS_PER_DRAIN, EngineLoop
from rollout.engine.messages import Abort, Control, ControlReply, GetInfo, Shutdown
from rollout.engine.process import _build_core
from rollout.errors import EngineDeadError, RolloutError

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3")


def test_a_fault_in_scheduling_fails_the_running_requests_and_the_engine_serves_on(model_dir, monkeypatch) -> None:
    """``Scheduler.schedule`` ran before the step's handler: one exception there ended the loop, and
    every later call got EngineDeadError."""
    with Engine(model_dir, max_total_tokens=512) as engine:
        want = [o.output_ids for o in engine.generate([[3, 4, 5], [7, 8, 9]], GREEDY)]
        original = sched.Scheduler.schedule
        armed = {"waiting": True, "running": False}

        def schedule(self):
            for state in ("waiting", "running"):
                if armed[state] and (state == "waiting" or self.running):
                    armed[state] = False
                    raise RuntimeError("a bookkeeping bug")
            return original(self)

        monkeypatch.setattr(sched.Scheduler, "schedule", schedule)
        # The fault finds the request waiting: it stays queued and runs to its end.
        assert engine.generate([3, 4, 5], GREEDY)[0].output_ids == want[0]
        assert not armed["waiting"]
        # It finds the request running: that one fails with the cause; nothing else is lost.
        armed["running"] = True
        with pytest.raises(RolloutError, match="a bookkeeping bug"):
            engine.generate([7, 8, 9], GREEDY)
        assert [o.output_ids for o in engine.generate([[3, 4, 5], [7, 8, 9]], GREEDY)] == want
        engine.check_integrity()


def test_a_flood_of_aborts_does_not_stop_the_steps(model_dir) -> None:
    """The loop applied commands until its inbox was empty before each step, so a sender that never
    let it run empty (aborts of unknown ids in a loop) kept the engine from ever stepping."""
    with Engine(model_dir, max_total_tokens=512) as engine:
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                engine.abort("no-such-request")

        threads = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        done: dict = {}

        def run() -> None:
            done["out"] = engine.generate([3, 4, 5], SamplingParams(temperature=0.0, max_new_tokens=20,
                                                                    ignore_eos=True))
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(30)  # a bound on a hang, not a timing figure: the request takes milliseconds
        finished_during_flood = "out" in done
        stop.set()
        for t in threads:
            t.join(5)
        worker.join(60)
        assert finished_during_flood, "no step ran while aborts kept coming"
        assert len(done["out"][0].output_ids) == 20


@pytest.mark.parametrize("separate_process", [False, True])
def test_calls_after_shutdown_fail_at_once(model_dir, separate_process: bool) -> None:
    engine = Engine(model_dir, max_total_tokens=256, separate_process=separate_process)
    engine.shutdown()
    box: dict = {}

    def run() -> None:
        try:
            engine.generate([3, 4, 5], GREEDY)
        except EngineDeadError as e:
            box["err"] = e
        try:
            engine.info()
        except EngineDeadError as e:
            box["info"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a call after shutdown waited forever"
    assert "err" in box and "info" in box


def test_array_prompts_are_token_ids(model_dir) -> None:
    """A 1-D numpy array or torch tensor is one prompt (it was taken for a batch and failed with a
    bare TypeError); a 2-D one is a batch."""
    with Engine(model_dir, max_total_tokens=512) as engine:
        want = engine.generate([3, 4, 5], GREEDY)[0].output_ids
        assert engine.generate(np.array([3, 4, 5]), GREEDY)[0].output_ids == want
        assert engine.generate(torch.tensor([3, 4, 5]), GREEDY)[0].output_ids == want
        outs = engine.generate(np.array([[3, 4, 5], [3, 4, 5]]), GREEDY)
        assert [o.output_ids for o in outs] == [want, want]


def test_every_command_of_a_long_burst_is_applied(model_dir) -> None:
    """A burst longer than one drain: the command after the bound is applied in the next drain (it
    was taken off the inbox and dropped, and its caller waited forever)."""
    core = _build_core(model_dir, {"max_total_tokens": 256})
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    for _ in range(MAX_COMMANDS_PER_DRAIN - 1):
        inbox.put(Abort(["nobody"]))
    for call_id in (1, 2, 3):
        inbox.put(Control(call_id, GetInfo()))
    thread = threading.Thread(target=EngineLoop(core, inbox, outbox.put).run, daemon=True)
    thread.start()
    replies: set[int] = set()
    try:
        while len(replies) < 3:
            replies |= {ev.call_id for ev in outbox.get(timeout=10) if isinstance(ev, ControlReply)}
    except queue.Empty:
        pass
    finally:
        inbox.put(Control(9, Shutdown()))
        thread.join(30)
    assert replies == {1, 2, 3}


def test_a_fault_while_adding_a_request_fails_that_request_only(model_dir, monkeypatch) -> None:
    """A bug in adding one request answers its caller with INTERNAL and leaves the running requests
    (and its id, for a retry) alone."""
    with Engine(model_dir, max_total_tokens=512) as engine:
        long = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
        want = engine.generate([3, 4, 5], long)[0].output_ids
        engine.pause("in_place")
        box: dict = {}
        worker = threading.Thread(target=lambda: box.setdefault("out", engine.generate([3, 4, 5], long)),
                                  daemon=True)
        worker.start()
        time.sleep(0.3)
        original = sched.Scheduler.add

        def add(self, seqs):
            if seqs[0].request_id == "unlucky":
                raise RuntimeError("a bookkeeping bug")
            return original(self, seqs)

        monkeypatch.setattr(sched.Scheduler, "add", add)
        with pytest.raises(RolloutError, match="a bookkeeping bug"):
            engine.generate([7, 8, 9], GREEDY, request_id="unlucky")
        monkeypatch.setattr(sched.Scheduler, "add", original)
        engine.continue_()
        worker.join(60)
        assert box["out"][0].output_ids == want
        assert len(engine.generate([7, 8, 9], GREEDY, request_id="unlucky")[0].output_ids) == 6
