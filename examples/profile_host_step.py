"""Host time of one decode step of the engine loop, split by phase, on CPU.

    python examples/profile_host_step.py                       # batch 1, 8 and 64
    python examples/profile_host_step.py --batch 1 --steps 2000 --logprobs
    python examples/profile_host_step.py --forward eager       # the CPU model forward instead
    python examples/profile_host_step.py --batch 1 --cprofile 25

With overlap scheduling the host work of step n+1 runs while step n is on the device, so the host
time of a step bounds the token rate of small models at small batches (where the device needs
well under a millisecond). This script measures that host time where nothing else is in the way:

- ``--forward graph`` (default): the decode path of a GPU run. A CPU stand-in for the captured
  decode graphs (``rollout.testing.cpu_graphs``) keeps their static input buffers and the runner's
  replay path (packed inputs, request-table writes, ``prepare``), but its replay returns a fixed
  hidden state: the forward costs nothing and what is left is the engine's own work. The LM head,
  the sampler and the host copies still run, as torch ops on the CPU.
- ``--forward eager``: the engine's CPU path as it is (per-step batch tensors, eager model forward).

The engine loop (``EngineLoop.run``) runs in this thread on a micro model (one layer, 64 wide,
vocabulary 512: ``--shape`` picks a bigger one of ``rollout.testing.benchmark.MODEL_SHAPES``),
with ``--batch`` streaming requests at temperature 0.6 in steady decode. Each phase is timed with
``perf_counter_ns`` around the engine method that does it, exclusive of the phases inside it; "loop"
is what the loop does around ``EngineCore.step`` (inbox, heartbeat, handing the events over).
The steps are timed in ``--repeats`` segments of ``--steps``; the fastest segment is reported, as
other work on the machine only ever adds time.

``--streams`` also times the path of ``examples/offline_throughput.py --batch1``: the in-process
``Engine`` (loop in a thread, events routed to asyncio streams, text decoded per chunk), whose
threads share the GIL with the loop; it reports the mean time between a stream's tokens.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import queue
import random
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

MICRO_SHAPE = dict(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096)

COUNTED_STEPS = 20  # steps run with every torch call counted, after the timed ones

# (object path on the core, method, phase), outermost first. A phase's time excludes the phases it calls.
PHASES = (
    ("", "step", "step (rest)"),
    ("scheduler", "schedule", "schedule + plan"),
    ("runner", "launch", "launch (rest)"),
    ("runner", "_replay_decode", "decode inputs"),
    ("runner", "_build_batch", "batch tensors"),
    ("runner.graphs", "replay", "forward"),
    ("runner.model", "forward", "forward"),
    ("runner", "_logits", "logits"),
    ("runner.sampler", "sample", "sample"),
    ("scheduler", "launched", "launched"),
    ("runner", "collect", "collect (runner)"),
    ("scheduler", "collect", "collect (scheduler)"),
    ("", "_chunk", "stream chunks"),
)


class PhaseTimer:
    """Exclusive nanoseconds per phase of wrapped methods (nested phases are subtracted)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self._children: list[int] = []  # per open call: time spent in phases it called

    def reset(self) -> None:
        self.ns.clear()

    def wrap(self, obj: Any, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            self._children.append(0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter_ns() - t0
                self.ns[phase] += dt - self._children.pop()
                if self._children:
                    self._children[-1] += dt

        setattr(obj, attr, timed)


class TorchCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called from Python (factories and views
    included): each one costs a dispatch on the host, and most a kernel launch on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_name: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        self.by_name[getattr(func, "__qualname__", None) or str(func)] += 1
        return func(*args, **(kwargs or {}))


def wrap_sampling_inputs(timer: PhaseTimer, core: Any) -> None:
    """Time the per-step sampling inputs (draws and tensors) wherever the runner builds them."""
    from rollout.runner import model_runner
    from rollout.sampling.sampling_batch import SamplingBatch

    for obj, attr in ((model_runner, "uniform_draws"), (SamplingBatch, "build"),
                      (getattr(core.runner, "_sampling", None), "batch")):
        if obj is not None and hasattr(obj, attr):
            timer.wrap(obj, attr, "sampling inputs")


def build_core(args: argparse.Namespace) -> Any:
    from rollout.config import EngineConfig
    from rollout.engine.core import EngineCore
    from rollout.testing.benchmark import MODEL_SHAPES
    from rollout.testing.random_model import write_random_model

    shape = dict(MICRO_SHAPE if args.shape == "micro" else MODEL_SHAPES[args.shape])
    path = os.path.join(tempfile.gettempdir(), f"rollout-host-step-{args.shape}")
    if not os.path.exists(os.path.join(path, "config.json")):
        arch = shape.pop("arch")
        write_random_model(path, arch, dtype="float32", write_weights=False, **shape)
    length = args.context + args.warmup + args.steps * args.repeats + 200
    return EngineCore(EngineConfig.build(
        path, device="cpu", dtype="float32", load_format="dummy", attention_backend="torch",
        max_running_requests=args.batch, max_total_tokens=args.batch * length + 1024))


def profile_batch(args: argparse.Namespace, batch: int) -> tuple[float, dict[str, float], float]:
    """Run ``batch`` requests to steady decode and time ``args.repeats`` segments of ``args.steps``
    steps; returns the per-step wall time and time of each phase (microseconds) of the fastest
    segment, and the torch calls per step."""
    from rollout.engine.loop import EngineLoop
    from rollout.engine.messages import Control, RequestFailed, Shutdown
    from rollout.engine.request_validation import make_add_request
    from rollout.testing.cpu_graphs import install_cpu_graphs
    from rollout.types import SamplingParams

    args = argparse.Namespace(**{**vars(args), "batch": batch})
    core = build_core(args)
    if args.forward == "graph":
        install_cpu_graphs(core.runner, run_model=False)
    timer = PhaseTimer()
    inbox: queue.Queue = queue.Queue()
    rng = random.Random(0)
    vocab = core.limits.vocab_size
    for i in range(batch):
        inbox.put(make_add_request(
            f"r{i}", input_ids=[rng.randrange(vocab) for _ in range(args.context)], text=None,
            sampling=SamplingParams(temperature=args.temperature, ignore_eos=True, seed=i,
                                    max_new_tokens=args.warmup + args.steps * args.repeats + 100),
            limits=core.limits, tokenizer=None, return_logprob=args.logprobs, return_raw_logprob=False,
            top_logprobs_num=0, stream=True))

    for path, attr, phase in PHASES:
        obj = core
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, attr):
            timer.wrap(obj, attr, phase)
    calls = TorchCalls()
    steps = 0
    segments: list[tuple[int, dict[str, int]]] = []  # per timed segment: wall ns, phase ns
    start = 0
    prof = cProfile.Profile() if args.cprofile else None
    step = core.step  # timed as a phase already
    timed_steps = args.steps * args.repeats

    def counted_step() -> list:
        nonlocal steps, start
        # Steps count from the first one with every request decoding (checked until then only).
        if steps or (not core.scheduler.waiting and not any(s.in_prompt_prefill for s in core.scheduler.running)):
            steps += 1
        timed = steps - args.warmup  # 1-based index among the timed steps
        if 0 < timed <= timed_steps and timed % args.steps == 1 % args.steps:
            timer.reset()
            start = time.perf_counter_ns()
            if prof is not None and timed == 1:
                prof.enable()
        if timed > timed_steps:  # then a few steps with every torch call counted
            with calls:
                out = step()
            if timed == timed_steps + COUNTED_STEPS:
                inbox.put(Control(1, Shutdown()))
            return out
        out = step()
        if 0 < timed <= timed_steps and timed % args.steps == 0:
            segments.append((time.perf_counter_ns() - start, dict(timer.ns)))
            if timed == timed_steps and prof is not None:
                prof.disable()
        return out

    core.step = counted_step
    wrap_sampling_inputs(timer, core)

    def send(events: list) -> None:
        # The front end's queue: the events are dropped here, but a failed step ends the run.
        failed = [e for e in events if isinstance(e, RequestFailed)]
        if failed:
            raise RuntimeError(f"a request failed: {failed[0].error_message}")

    EngineLoop(core, inbox, send).run()
    # The quietest segment: other work on the machine only ever adds time.
    wall, phase_ns = min(segments, key=lambda seg: seg[0])
    n = args.steps
    total_us = wall / 1e3 / n
    phases = {k: v / 1e3 / n for k, v in phase_ns.items()}
    phases["loop"] = total_us - sum(phases.values())
    if args.calls:
        print(f"--- torch calls per step, batch {batch}")
        for name, k in calls.by_name.most_common(args.calls):
            print(f"{k / COUNTED_STEPS:8.1f}  {name}")
    if prof is not None:
        print(f"--- cProfile, batch {batch}, {n} steps")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)
    return total_us, phases, calls.count / COUNTED_STEPS


def stream_step_us(args: argparse.Namespace, batch: int) -> float:
    """The mean time between tokens (us) of ``batch`` asyncio streams of the in-process ``Engine``
    (best of ``args.repeats`` runs of ``args.steps`` tokens each), with ``--forward graph``'s
    stand-in for the decode graphs when asked."""
    import asyncio

    import rollout.engine.process as engine_process
    from rollout import Engine, SamplingParams
    from rollout.testing.benchmark import run_streams, summarize
    from rollout.testing.cpu_graphs import install_cpu_graphs

    build = engine_process._build_core

    def build_with_graphs(*a: Any) -> Any:
        core = build(*a)
        if args.forward == "graph":
            install_cpu_graphs(core.runner, run_model=False)
        return core

    engine_process._build_core = build_with_graphs
    try:
        path = build_core(argparse.Namespace(**{**vars(args), "batch": 1})).config.model_path
        engine = Engine(path, device="cpu", dtype="float32", load_format="dummy", attention_backend="torch",
                        max_running_requests=batch)
    finally:
        engine_process._build_core = build
    rng = random.Random(0)
    prompts = [[rng.randrange(3, engine.limits.vocab_size) for _ in range(args.context)] for _ in range(batch)]
    params = [SamplingParams(temperature=args.temperature, max_new_tokens=args.steps, ignore_eos=True, seed=i)
              for i in range(batch)]
    best = float("inf")
    for _ in range(args.repeats):
        records, seconds = asyncio.run(run_streams(engine.async_stream, prompts, params))
        best = min(best, summarize(records, seconds)["mean_itl_ms"] * 1e3)
    engine.shutdown()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=200, help="decode steps per timed segment")
    ap.add_argument("--repeats", type=int, default=5, help="timed segments; the fastest one is reported")
    ap.add_argument("--warmup", type=int, default=50, help="decode steps before timing")
    ap.add_argument("--context", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--logprobs", action="store_true", help="requests return the logprobs of their tokens")
    ap.add_argument("--forward", choices=("graph", "eager"), default="graph")
    ap.add_argument("--shape", default="micro", help="micro, or a shape of rollout.testing.benchmark.MODEL_SHAPES")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--cprofile", type=int, default=0, help="also list the top N functions by own time")
    ap.add_argument("--calls", type=int, default=0, help="also list the N torch calls made most per step")
    ap.add_argument("--streams", action="store_true", help="also time the in-process Engine's streams")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    results = {b: profile_batch(args, b) for b in batches}

    names = sorted({p for _, ph, _ in results.values() for p in ph}, key=_phase_order)
    width = max(len(n) for n in names) + 2
    print(f"host us per decode step (forward {args.forward}, temperature {args.temperature}, "
          f"logprobs {'on' if args.logprobs else 'off'}, best of {args.repeats} x {args.steps} steps, "
          f"torch threads {args.threads})")
    print(f"{'phase':<{width}}" + "".join(f"{f'batch {b}':>12}" for b in batches))
    for name in names:
        print(f"{name:<{width}}" + "".join(f"{results[b][1].get(name, 0.0):>12.1f}" for b in batches))
    print(f"{'total':<{width}}" + "".join(f"{results[b][0]:>12.1f}" for b in batches))
    no_fwd: Callable[[int], float] = lambda b: results[b][0] - results[b][1].get("forward", 0.0)
    print(f"{'total - forward':<{width}}" + "".join(f"{no_fwd(b):>12.1f}" for b in batches))
    print(f"{'torch calls / step':<{width}}" + "".join(f"{results[b][2]:>12.1f}" for b in batches))
    if args.streams:
        streams = {b: stream_step_us(args, b) for b in batches}
        print(f"{'Engine streams, us/step':<{width}}" + "".join(f"{streams[b]:>12.1f}" for b in batches))


def _phase_order(name: str) -> int:
    order = [p for _, _, p in PHASES] + ["sampling inputs", "loop"]
    return order.index(name) if name in order else len(order)


if __name__ == "__main__":
    main()
