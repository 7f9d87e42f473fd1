"""Zero-pause weight swap against pause + push + continue, during a steady decode.

    python examples/weight_swap_bench.py --shape llama-8b               # 2 GPUs: trainer GPU 0 -> engine GPU 1 (NCCL)
    python examples/weight_swap_bench.py --shape llama-8b --one-gpu     # trainer and engine share GPU 0 (CUDA IPC)
    python examples/weight_swap_bench.py --shape tiny                   # CPU: gloo

The engine (its own process, random weights of the shape) decodes ``--batch`` streams of long greedy
outputs. Every ``--interval-s`` seconds the trainer pushes a full state dict of the shape, alternately
in swap mode (``push(..., swap=True)``) and the pausing way (pause in place, push, continue), so both
are measured in the same run on the same decode. For each update it prints the transfer time, the
largest gap between two tokens of a stream during the update and how much that exceeds a normal step
(the median gap outside updates), and the decode throughput during the update against the steady
throughput (the tokens lost to the update).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.config import ModelConfig
from rollout.testing.benchmark import MODEL_SHAPES


@dataclass
class Timeline:
    """Arrival time and token count of every chunk of every stream (the reading thread appends)."""

    chunks: list[list[tuple[float, int]]] = field(default_factory=list)
    stop: bool = False
    errors: list[BaseException] = field(default_factory=list)

    def tokens(self) -> int:
        return sum(n for stream in self.chunks for _, n in stream)


def model_dir(shape: str, dtype: str) -> str:
    from rollout.testing.random_model import write_random_model

    path = os.path.join(tempfile.gettempdir(), f"rollout-bench-{shape}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        if shape == "tiny":
            write_random_model(path, "qwen3")
        else:
            spec = dict(MODEL_SHAPES[shape])
            arch = spec.pop("arch")
            # Config and tokenizer only: the engine fills random weights (load_format="dummy").
            write_random_model(path, arch, dtype=dtype, write_weights=False, **spec)
    return path


def trainer_state(shape: str, engine_path: str, device: torch.device,
                  dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """A random state dict under Hugging Face names, every tensor a view of one flat buffer."""
    if shape == "tiny":
        from rollout.models.loader import iter_checkpoint

        return [(n, (t * 1.01).to(device, dtype)) for n, t in iter_checkpoint(engine_path)]
    from weight_sync_bench import hf_param_shapes  # examples/ is on the path when this script runs

    shapes = hf_param_shapes(shape)
    total = sum(torch.Size(s).numel() for _, s in shapes)
    flat = torch.empty(total, dtype=dtype, device=device).normal_(0, 0.02)
    out, at = [], 0
    for name, s in shapes:
        n = torch.Size(s).numel()
        out.append((name, flat[at:at + n].view(s)))
        at += n
    return out


def read_streams(engine: Engine, batch: int, input_len: int, output_len: int, vocab: int,
                 timeline: Timeline) -> None:
    """Run ``batch`` greedy streams in an asyncio loop of this thread, recording every chunk."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=output_len, ignore_eos=True)

    async def one(i: int) -> None:
        record = timeline.chunks[i]
        prompt = [(7 * i + j) % (vocab - 10) + 5 for j in range(input_len)]
        async for chunk in engine.async_stream(prompt, sp, request_id=f"decode-{i}"):
            record.append((time.perf_counter(), len(chunk.token_ids)))
            if timeline.stop:
                break

    async def run() -> None:
        results = await asyncio.gather(*(one(i) for i in range(batch)), return_exceptions=True)
        timeline.errors += [r for r in results if isinstance(r, BaseException)]

    timeline.chunks = [[] for _ in range(batch)]
    asyncio.run(run())


def window_figures(timeline: Timeline, t0: float, t1: float, step_s: float, steady_tok_s: float) -> dict:
    """The largest inter-token gap touching [t0, t1] and the tokens decoded inside it."""
    worst, tokens = 0.0, 0
    for stream in timeline.chunks:
        for (a, _), (b, n) in zip(stream, stream[1:]):
            if b >= t0 and a <= t1:
                worst = max(worst, b - a)
            if t0 <= b <= t1:
                tokens += n
    dur = t1 - t0
    return dict(gap_ms=worst * 1e3, over_ms=(worst - step_s) * 1e3, tok_s=tokens / dur if dur > 0 else 0.0,
                lost=max(steady_tok_s * dur - tokens, 0.0))


def steady_step(timeline: Timeline, windows: list[tuple[float, float]]) -> tuple[float, float]:
    """The median gap between tokens outside every update window, and the steady tokens/s."""
    gaps, first, last, tokens = [], float("inf"), 0.0, 0
    margin = 0.2
    for stream in timeline.chunks:
        for (a, _), (b, n) in zip(stream[5:], stream[6:]):
            if all(b < t0 - margin or a > t1 + margin for t0, t1 in windows):
                gaps.append(b - a)
                first, last, tokens = min(first, a), max(last, b), tokens + n
    busy = sum(t1 - t0 + 2 * margin for t0, t1 in windows)
    return statistics.median(gaps), tokens / max(last - first - busy, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny", help="tiny (CPU) or a key of rollout.testing.benchmark.MODEL_SHAPES")
    ap.add_argument("--one-gpu", action="store_true", help="trainer and engine on GPU 0, pushed by CUDA IPC")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=8192)
    ap.add_argument("--updates", type=int, default=3, help="updates of each kind (swap, pause)")
    ap.add_argument("--interval-s", type=float, default=3.0)
    ap.add_argument("--kv-memory-fraction", type=float, default=0.5, help="leaves room for the shadow weights")
    args = ap.parse_args()

    cpu = args.shape == "tiny"
    dtype = "float32" if cpu else "bfloat16"
    path = model_dir(args.shape, dtype)
    two_gpus = not cpu and not args.one_gpu
    trainer_dev = torch.device("cpu") if cpu else torch.device("cuda", 0)
    engine_dev = "cpu" if cpu else ("cuda:1" if two_gpus else "cuda:0")
    if not cpu:
        torch.cuda.set_device(trainer_dev)
    state = trainer_state(args.shape, path, trainer_dev, getattr(torch, dtype))
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    opts = dict(device=engine_dev, dtype=dtype, max_running_requests=args.batch)
    if not cpu:
        opts.update(load_format="dummy", kv_memory_fraction=args.kv_memory_fraction)
    else:
        opts.update(max_total_tokens=args.batch * (args.input_len + args.output_len + 8))
    engine = Engine(path, separate_process=True, **opts)
    group = None
    try:
        if not args.one_gpu:
            group = weight_sync.connect([engine], backend="gloo" if cpu else "nccl", device=trainer_dev,
                                        timeout_s=600)

        def push(version: int, swap: bool):
            if group is not None:
                return group.push(state, version=version, swap=swap)
            return weight_sync.push_tensors_ipc([engine], state, version=version, swap=swap)

        push(1, swap=False)  # warm: plans, layouts, communicator
        timeline = Timeline()
        reader = threading.Thread(target=read_streams, daemon=True,
                                  args=(engine, args.batch, args.input_len, args.output_len,
                                        ModelConfig.from_pretrained(path).vocab_size, timeline))
        reader.start()
        while len(timeline.chunks) < args.batch or min(len(s) for s in timeline.chunks) < 20:
            if timeline.errors or not reader.is_alive():
                raise RuntimeError(f"the decode streams failed: {timeline.errors[:1]}")
            time.sleep(0.05)
        print(f"{args.shape}: {nbytes / 2**30:.2f} GiB of weights, batch {args.batch}, engine {engine_dev}, "
              f"trainer {trainer_dev} ({'gloo' if cpu else 'CUDA IPC' if args.one_gpu else 'NCCL'})")
        rows, windows, version = [], [], 1
        for i in range(2 * args.updates):
            time.sleep(args.interval_s)
            swap = i % 2 == 0
            version += 1
            t0 = time.perf_counter()
            if swap:
                result = push(version, swap=True)
                note = "" if result.swapped else f"fell back: {result.note}"
            else:
                engine.pause("in_place")
                push(version, swap=False)
                engine.continue_()
                note = ""
            t1 = time.perf_counter()
            windows.append((t0, t1))
            rows.append(("swap" if swap else "pause+push+continue", t0, t1, note))
        time.sleep(1.0)
        timeline.stop = True
        engine.abort()
        reader.join(timeout=60)
        step_s, steady = steady_step(timeline, windows)
        print(f"steady decode: step {step_s * 1e3:.2f} ms (median gap between tokens), {steady:.0f} tok/s\n")
        print(f"{'mode':<22}{'update s':>9}{'max gap ms':>12}{'over step ms':>14}{'tok/s during':>14}"
              f"{'tokens lost':>13}")
        for mode, t0, t1, note in rows:
            f = window_figures(timeline, t0, t1, step_s, steady)
            print(f"{mode:<22}{t1 - t0:>9.3f}{f['gap_ms']:>12.2f}{f['over_ms']:>14.2f}{f['tok_s']:>14.0f}"
                  f"{f['lost']:>13.0f}  {note}")
    finally:
        if group is not None:
            group.close()
        engine.shutdown()


if __name__ == "__main__":
    main()
