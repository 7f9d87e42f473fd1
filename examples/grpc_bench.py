"""Throughput and latency of the same workload through gRPC and through the in-process engine.

    python examples/grpc_bench.py                         # default model, CPU, a server it starts itself
    python examples/grpc_bench.py --address HOST:PORT     # against a running server (same --model!)
    python examples/grpc_bench.py --model DIR --device cuda --dtype bfloat16 --num-requests 256 \\
        --input-len 100 1024 --output-len 100 1024

Workload: random token ids, input and output lengths uniform in the given ranges (seeded),
temperature 0.6, ignore_eos, every request streamed. Prints what SGLang's and vLLM's serving
benchmarks print (see ANCHORS.md): TTFT is the time to the first streamed token; ITL is the gap
between consecutive chunks, spread evenly over the tokens of a chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np

from rollout.client import AsyncRolloutClient
from rollout.types import SamplingParams, StreamChunk

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]


@dataclass
class RequestStats:
    ok: bool
    input_len: int
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    duration: float
    stats: list[RequestStats]


def make_workload(
    n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int, temperature: float
) -> Workload:
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(*input_len))])
        params.append(
            SamplingParams(
                temperature=temperature,
                max_new_tokens=rng.randint(*output_len),
                ignore_eos=True,
                seed=seed + i,
            )
        )
    return Workload(prompts, params)


StreamFn = Callable[[list[int], SamplingParams], AsyncIterator[StreamChunk]]


async def run_workload(stream: StreamFn, work: Workload, concurrency: int) -> RunResult:
    """Send every request (at most ``concurrency`` in flight) and time their chunks."""
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int], sp: SamplingParams) -> RequestStats:
        st = RequestStats(ok=False, input_len=len(prompt))
        async with gate:
            start = last = time.perf_counter()
            try:
                async for chunk in stream(prompt, sp):
                    now = time.perf_counter()
                    k = len(chunk.token_ids)
                    if k and st.output_len == 0:
                        st.ttft = now - start
                    elif k:
                        st.itl += [(now - last) / k] * k
                    if k:
                        last = now
                    st.output_len += k
                st.ok = st.output_len == sp.max_new_tokens
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                print(f"request failed: {e}", file=sys.stderr)
        return st

    t0 = time.perf_counter()
    stats = await asyncio.gather(*(one(p, sp) for p, sp in zip(work.prompts, work.params)))
    return RunResult(time.perf_counter() - t0, list(stats))


def summarize(r: RunResult) -> dict[str, float]:
    ok = [s for s in r.stats if s.ok]
    ttft = np.array([s.ttft for s in ok]) * 1e3 if ok else np.zeros(1)
    itl = np.array([x for s in ok for x in s.itl]) * 1e3 if any(s.itl for s in ok) else np.zeros(1)
    inp, out = sum(s.input_len for s in ok), sum(s.output_len for s in ok)
    return {
        "Successful requests:": len(ok),
        "Benchmark duration (s):": r.duration,
        "Total input tokens:": inp,
        "Total generated tokens:": out,
        "Request throughput (req/s):": len(ok) / r.duration,
        "Input token throughput (tok/s):": inp / r.duration,
        "Output token throughput (tok/s):": out / r.duration,
        "Total token throughput (tok/s):": (inp + out) / r.duration,
        "Mean TTFT (ms):": float(ttft.mean()),
        "Median TTFT (ms):": float(np.percentile(ttft, 50)),
        "P99 TTFT (ms):": float(np.percentile(ttft, 99)),
        "Mean ITL (ms):": float(itl.mean()),
        "Median ITL (ms):": float(np.percentile(itl, 50)),
        "P99 ITL (ms):": float(np.percentile(itl, 99)),
    }


def print_table(columns: dict[str, dict[str, float]]) -> None:
    names = list(columns)
    print("\n{s:=^{w}}".format(s=" Serving Benchmark Result ", w=40 + 16 * len(names)))
    print(f"{'':<40}" + "".join(f"{n:>16}" for n in names))
    for i, key in enumerate(next(iter(columns.values()))):
        if i == 8:
            print("{s:-^{w}}".format(s="Time to First Token", w=40 + 16 * len(names)))
        if i == 11:
            print("{s:-^{w}}".format(s="Inter-token Latency", w=40 + 16 * len(names)))
        cells = [columns[n][key] for n in names]
        fmt = "{:>16d}" if all(isinstance(c, int) for c in cells) else "{:>16.2f}"
        print(f"{key:<40}" + "".join(fmt.format(c) for c in cells))
    print("=" * (40 + 16 * len(names)))


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def start_server(model: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "rollout",
        "serve",
        "--model",
        model,
        "--port",
        "0",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # the server prints its address before loading the model
        m = re.search(r"listening on (\S+:\d+)", line)
        if m:
            # Keep draining its output so the server never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError(f"the server exited with code {proc.wait()}")


async def bench_grpc(address: str, work: Workload, args: argparse.Namespace) -> RunResult:
    async with AsyncRolloutClient(address, token=args.token) as client:
        await client.wait_ready(600)
        warm = make_workload(args.warmup, (8, 16), (4, 8), args.vocab, 1, args.temperature)
        await run_workload(client.stream, warm, args.concurrency)
        return await run_workload(client.stream, work, args.concurrency)


async def bench_engine(model: str, work: Workload, args: argparse.Namespace) -> RunResult:
    from rollout.engine import Engine

    engine = Engine(model, device=args.device, dtype=args.dtype)
    try:

        def stream(prompt: list[int], sp: SamplingParams) -> AsyncIterator[StreamChunk]:
            return engine.async_stream(prompt, sp)

        warm = make_workload(args.warmup, (8, 16), (4, 8), args.vocab, 1, args.temperature)
        await run_workload(stream, warm, args.concurrency)
        return await run_workload(stream, work, args.concurrency)
    finally:
        engine.shutdown()


async def main_async(args: argparse.Namespace) -> int:
    from rollout.config import ModelConfig
    from rollout.default_model import default_model_path

    model = args.model or default_model_path()
    cfg = ModelConfig.from_pretrained(model)
    args.vocab = cfg.vocab_size - 8  # leave the special tokens at the top of the vocabulary alone
    work = make_workload(
        args.num_requests,
        tuple(args.input_len),
        tuple(args.output_len),
        args.vocab,
        args.seed,
        args.temperature,
    )
    print(
        f"model {model}: {cfg.architecture}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}"
    )
    print(
        f"device {args.device}, dtype {args.dtype}; {args.num_requests} requests, input {args.input_len[0]}-"
        f"{args.input_len[1]}, output {args.output_len[0]}-{args.output_len[1]} tokens, temperature "
        f"{args.temperature}, ignore_eos, concurrency {args.concurrency}, {args.warmup} warm-up requests"
    )
    columns: dict[str, dict[str, float]] = {}
    if not args.skip_grpc:
        proc = None
        address = args.address
        if address is None:
            proc, address = start_server(model, args)
        try:
            columns["gRPC"] = summarize(await bench_grpc(address, work, args))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    if not args.skip_engine:
        columns["in-process"] = summarize(await bench_engine(model, work, args))
    print_table(columns)
    return 0 if all(c["Successful requests:"] == args.num_requests for c in columns.values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded default model)")
    p.add_argument("--address", default=None, help="a running server (else one is started)")
    p.add_argument("--token", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at most")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--skip-grpc", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
