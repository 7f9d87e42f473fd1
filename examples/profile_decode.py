"""Where a decode step's time goes: host time per step and the device kernels of a few steps.

    python examples/profile_decode.py --shape qwen3-0.6b --batch 256 --context 600
    python examples/profile_decode.py --shape qwen3-0.6b --batch 1
    python examples/profile_decode.py --shape qwen3-0.6b --batch 256 --deterministic

Runs the engine core directly (no front end): fills ``--batch`` sequences of ``--context`` prompt
tokens, lets them reach steady decode, then times ``--steps`` steps and profiles a few more with
torch.profiler, printing the kernels by total device time.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def print_device_busy(prof, steps: int, wall_ms: float) -> None:
    """Device time per step against the step's wall time: how much of a step the GPU is busy.

    Kernels of replayed graphs are recorded too, so the busy time is every kernel and copy of the
    profiled steps; the rest of the span is the GPU waiting for the host."""
    from torch.autograd import DeviceType

    spans = [e.time_range for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not spans:
        print("no device events recorded")
        return
    busy_ms = sum(r.elapsed_us() for r in spans) / 1e3 / steps
    span_ms = (max(r.end for r in spans) - min(r.start for r in spans)) / 1e3 / steps
    print(f"device busy {busy_ms:.3f} ms per step over a {span_ms:.3f} ms span (profiled), {len(spans) // steps} "
          f"device events per step; untraced wall time {wall_ms:.3f} ms per step "
          f"(busy {busy_ms / wall_ms:.0%} of it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=600, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--rows", type=int, default=25, help="kernels listed")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deterministic", action="store_true", help="batch-invariant kernels")
    ap.add_argument("--trace", help="also write the profiled steps' Chrome trace (JSON) here")
    args = ap.parse_args()
    import logging

    logging.basicConfig(format="%(name)s %(message)s")
    logging.getLogger("rollout.layers.skinny").setLevel(logging.INFO)  # which kernel each linear took

    import argparse as _a

    from examples.offline_throughput import model_dir
    from rollout.config import EngineConfig
    from rollout.engine.core import EngineCore
    from rollout.engine.request_validation import make_add_request
    from rollout.types import SamplingParams

    gpu = args.device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    path = model_dir(_a.Namespace(model=None, shape=args.shape, dtype=dtype))
    core = EngineCore(EngineConfig.build(
        path, device=args.device, dtype=dtype, load_format="dummy" if args.shape != "tiny" else "auto",
        attention_backend="triton" if gpu else "torch",
        max_running_requests=max(args.batch, 1), overlap_schedule=not args.no_overlap,
        deterministic=args.deterministic))

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    rng = random.Random(0)
    vocab = core.limits.vocab_size
    total = args.steps + 40
    for i in range(args.batch):
        core.add(make_add_request(
            f"r{i}", input_ids=[rng.randrange(vocab) for _ in range(args.context)], text=None,
            sampling=SamplingParams(temperature=args.temperature, max_new_tokens=total, ignore_eos=True, seed=i),
            limits=core.limits, tokenizer=None, return_logprob=True, return_raw_logprob=False, top_logprobs_num=0,
            stream=True))
    # Prefill and settle into decode.
    while any(s.in_prompt_prefill for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    for _ in range(5):
        core.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    sync()
    per_step = (time.perf_counter() - t0) / args.steps
    print(f"{args.shape} batch {args.batch} context ~{args.context}: {per_step * 1e3:.3f} ms/step, "
          f"{args.batch / per_step:,.0f} tok/s (overlap {'off' if args.no_overlap else 'on'})")
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            core.step()
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if gpu:
        print_device_busy(prof, steps=5, wall_ms=per_step * 1e3)
    core.shutdown()
    core.close()


if __name__ == "__main__":
    main()
