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
import re
import signal
import subprocess
import sys
import threading
from typing import Any

from rollout.client import AsyncRolloutClient
from rollout.testing.benchmark import StreamFn, Workload, format_report, run_streams, summarize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


async def bench(stream: StreamFn, work: Workload, args: argparse.Namespace) -> dict[str, float]:
    """Warm up, then run the workload; returns the harness figures."""
    warm = Workload.random(args.warmup, 8, 16, 4, 8, args.vocab, seed=1)
    await run_streams(stream, warm.prompts, warm.sampling_params(args.temperature), args.concurrency)
    records, duration = await run_streams(stream, work.prompts, work.sampling_params(args.temperature, args.seed),
                                          args.concurrency, progress="benchmark")
    return summarize(records, duration)


async def bench_grpc(address: str, work: Workload, args: argparse.Namespace) -> dict[str, float]:
    async with AsyncRolloutClient(address, token=args.token) as client:
        await client.wait_ready(600)
        return await bench(client.stream, work, args)


async def bench_engine(model: str, work: Workload, args: argparse.Namespace) -> dict[str, float]:
    from rollout.engine.api import Engine

    engine = Engine(model, device=args.device, dtype=args.dtype)
    try:
        return await bench(engine.async_stream, work, args)
    finally:
        engine.shutdown()


async def main_async(args: argparse.Namespace) -> int:
    from rollout.config import ModelConfig
    from rollout.default_model import default_model_path

    model = args.model or default_model_path()
    cfg = ModelConfig.from_pretrained(model)
    args.vocab = cfg.vocab_size - 8  # leave the special tokens at the top of the vocabulary alone
    work = Workload.random(args.num_requests, *args.input_len, *args.output_len, args.vocab, seed=args.seed)
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
            columns["gRPC"] = await bench_grpc(address, work, args)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    if not args.skip_engine:
        columns["in-process"] = await bench_engine(model, work, args)
    print(format_report("gRPC vs in-process, same workload", columns))
    return 0 if all(c["successful_requests"] == args.num_requests for c in columns.values()) else 1


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
