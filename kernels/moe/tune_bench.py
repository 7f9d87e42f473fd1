"""GPU measurement for ``kernels.moe.tune``: compile variants in parallel, time launches from CUDA graphs.

Compiling is most of a tuning run's cost and is CPU-bound, so worker processes compile the variants
first: each launches every variant once on a one-expert dummy problem whose blocks are all padding
(the kernel returns at once), which leaves the binary in Triton's on-disk cache under the same key
the real launch computes (same argument dtypes, same integer values, the row count unspecialised).
The main process then loads instead of compiling. A variant whose compile or launch fails (too much
shared memory, a compiler error) is reported and left out.

Timing: ``time_us`` captures a few launches in a CUDA graph and replays it, so launch overhead (which
decode never pays: it runs in graphs) stays out, and the launches cycle over several copies of the
expert weights, so weights come from HBM as they do in a model whose layers each have their own.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from kernels.moe.align import ExpertAlignment
from kernels.moe.fused_moe import launch_down, launch_gate_up
from kernels.moe.tune_space import GATE_UP, Variant


@dataclass(frozen=True, slots=True)
class Problem:
    """The shape being tuned (what the compiled binaries depend on)."""

    experts: int
    hidden: int
    inter: int  # expert width this rank holds
    top_k: int
    dtype: torch.dtype


_WORKER: dict[str, torch.Tensor] = {}  # one worker's dummy buffers, built by _worker_init


def _worker_init(problem: Problem, device: str) -> None:
    # One expert's weights suffice: the kernels see the expert stride, not the expert count.
    dev, dt, h, i = torch.device(device), problem.dtype, problem.hidden, problem.inter
    _WORKER.update(x=torch.zeros(1, h, dtype=dt, device=dev), w13=torch.zeros(1, 2 * i, h, dtype=dt, device=dev),
                   w2=torch.zeros(1, h, i, dtype=dt, device=dev), act=torch.zeros(1, i, dtype=dt, device=dev),
                   y=torch.zeros(1, h, dtype=dt, device=dev), weights=torch.zeros(1, device=dev))


def _compile_one(args: tuple[Problem, Variant]) -> str | None:
    """Compile (and launch on padding only) one variant; the error text on failure."""
    problem, v = args
    w = _WORKER
    dev = w["x"].device
    align = ExpertAlignment(torch.zeros(v.block_m, dtype=torch.int32, device=dev),
                            torch.full((1,), -1, dtype=torch.int32, device=dev), v.block_m, problem.top_k)
    try:
        if v.kernel == GATE_UP:
            launch_gate_up(w["x"], w["w13"], w["act"], align, problem.top_k, v.tiles)
        else:
            launch_down(w["act"], w["w2"], w["y"], w["weights"], align, v.tiles)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # out of shared memory, a compiler error: this variant is skipped
        return error_text(exc)
    return None


def error_text(exc: BaseException) -> str:
    """The exception's type and first line, short enough for a progress line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def precompile(problem: Problem, todo: Sequence[Variant], workers: int, device: torch.device) -> dict[Variant, str]:
    """Compile ``todo`` in ``workers`` processes (0: in this one); returns the failed variants' errors.
    Should the process pool itself break, the variants are left to compile at their first launch."""
    if workers <= 0 or device.type != "cuda":
        _worker_init(problem, str(device))
        results = [_compile_one((problem, v)) for v in todo]
    else:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(problem, str(device))) as pool:
                results = list(pool.map(_compile_one, [(problem, v) for v in todo], chunksize=1))
        except Exception as exc:  # e.g. a worker that could not start: compile lazily instead
            print(f"parallel compile failed ({error_text(exc)}); variants compile at first use", flush=True)
            return {}
    return {v: err for v, err in zip(todo, results) if err is not None}


def default_workers() -> int:
    """One compile process per CPU core but one, at most 32."""
    return max(1, min(32, (os.cpu_count() or 2) - 1))


def time_us(launch: Callable[[int], object], copies: int, device: torch.device, budget_ms: float = 3.0,
            max_reps: int = 20) -> float:
    """Median microseconds of one ``launch(i)`` (``i`` cycles over ``copies`` weight copies). On CUDA
    from a graph of ``2 * copies`` launches replayed until about ``budget_ms`` are spent (3 to
    ``max_reps`` replays); on the CPU (the interpreter: a smoke run, times mean nothing) by the
    clock."""
    n = 2 * copies
    if device.type != "cuda":
        begin = time.perf_counter()
        for i in range(n):
            launch(i % copies)
        return (time.perf_counter() - begin) * 1e6 / n
    launch(0)  # anything not yet compiled and loaded is, before the capture (a module load may not be captured)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(n):
            launch(i % copies)
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[float] = []
    while len(times) < 3 or (len(times) < max_reps and sum(times) < budget_ms):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1e3 / n
