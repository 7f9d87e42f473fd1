"""Where a decode step's time goes: host time per step and the device kernels of a few steps.

    python examples/profile_decode.py --shape qwen3-0.6b --batch 256 --context 600
    python examples/profile_decode.py --shape qwen3-0.6b --batch 1
    python examples/profile_decode.py --shape qwen3-0.6b --batch 256 --deterministic
    python examples/profile_decode.py --shape qwen3-0.6b --batch 128 --context 1200 --ragged 0.5 --long 0.05 --group 8

Runs the engine core directly (no front end): fills ``--batch`` sequences of ``--context`` prompt
tokens, lets them reach steady decode, then times ``--steps`` steps and profiles a few more with
torch.profiler, printing the kernels by total device time. ``--ragged`` / ``--long`` spread the
prompt lengths as a continuously batched RL step has them (a few samples far longer than the
rest); ``--group`` gives each group of that many sequences one prompt, as GRPO samples share
theirs, so their KV is shared through the prefix cache.
"""

from __future__ import annotations

import argparse
import math
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


def prompt_lengths(batch: int, context: int, ragged: float, long: float, seed: int = 0) -> list[int]:
    """Prompt lengths of ``batch`` sequences: ``context`` each, or uniform in ``context * (1 +-
    ragged)``; ``long``: that fraction of them (at least one if above 0) five times as long."""
    rng = random.Random(seed)
    lo, hi = max(1, round(context * (1 - ragged))), max(1, round(context * (1 + ragged)))
    lens = [rng.randint(lo, hi) for _ in range(batch)]
    for i in rng.sample(range(batch), min(batch, math.ceil(long * batch)) if long > 0 else 0):
        lens[i] *= 5
    return lens


def make_prompts(batch: int, context: int, ragged: float, long: float, group: int, vocab: int,
                 seed: int = 0) -> list[list[int]]:
    """Random prompts of ``prompt_lengths``; sequences ``g * group .. (g + 1) * group - 1`` share
    the prompt of the first of them (a GRPO group)."""
    rng = random.Random(seed)
    lens = prompt_lengths(batch, context, ragged, long, seed)
    prompts: list[list[int]] = []
    for i, n in enumerate(lens):
        first = i - i % max(group, 1)
        prompts.append(list(prompts[first]) if first != i else [rng.randrange(vocab) for _ in range(n)])
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=600, help="prompt tokens per sequence")
    ap.add_argument("--ragged", type=float, default=0.0, help="prompt lengths uniform in context * (1 +- this)")
    ap.add_argument("--long", type=float, default=0.0, help="this fraction of sequences 5x as long")
    ap.add_argument("--group", type=int, default=1, help="sequences per shared prompt (a GRPO group)")
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

    total = args.steps + 40
    prompts = make_prompts(args.batch, args.context, args.ragged, args.long, args.group, core.limits.vocab_size)
    for i, prompt in enumerate(prompts):
        core.add(make_add_request(
            f"r{i}", input_ids=prompt, text=None,
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
    spread = f", ragged {args.ragged:g}, long {args.long:g}, groups of {args.group}" if (
        args.ragged or args.long or args.group > 1) else ""
    print(f"{args.shape} batch {args.batch} context ~{args.context}{spread}: {per_step * 1e3:.3f} ms/step, "
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
