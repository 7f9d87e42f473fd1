"""Where the offline workload's time goes: the engine core stepped directly, step by step.

    python examples/workload_timeline.py --shape qwen3-0.6b          # the ANCHORS offline shape on a GPU
    python examples/workload_timeline.py --device cpu --shape tiny   # a small run of the same on CPU

Runs the workload of ``examples/offline_throughput.py`` (256 requests, input and output lengths
uniform in [100, 1024], seed 0, temperature 0.6, ignore_eos) without any front end: every request
is added to an ``EngineCore`` up front and the core is stepped until it is idle. Each step's wall
time is recorded with what it computed (prompt tokens, decode sequences, their contexts), and the
steps are grouped into phases: steps with prompt work, then pure decode steps by batch size. Next
to each group: the memory roofline of those steps (all weights once plus every running
sequence's KV, at the copy bandwidth measured here) and the fraction of it reached.

With overlap scheduling a step's wall time is the larger of its host work and the device time of
the step launched before it, so the groups show where the device or the host is the limit.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

BANDS = ((1, 16), (17, 64), (65, 128), (129, 192), (193, 256), (257, 1 << 30))


@dataclass(slots=True)
class StepRecord:
    """One engine step: wall seconds, prompt tokens, decode sequences and the KV tokens they read."""

    seconds: float
    prompt_tokens: int
    decode_seqs: int
    kv_tokens: int  # sum over the step's entries of prefix + new tokens


def record_steps(core, profile_steps: int = 0, rows: int = 30) -> list[StepRecord]:
    """Step ``core`` until idle; one record per step (the plan scheduled in that step).

    ``profile_steps``: profile the first that many steps (torch.profiler) and print their kernels."""
    scheduled: list[tuple[int, int, int]] = []
    schedule = core.scheduler.schedule

    def observed_schedule():
        picked = schedule()
        if picked is not None:
            plan, _ = picked
            decode = sum(1 for n in plan.extend_lens if n == 1)
            prompt = plan.num_tokens - decode
            kv = sum(p + n for p, n in zip(plan.prefix_lens, plan.extend_lens))
            scheduled.append((prompt, decode, kv))
        else:
            scheduled.append((0, 0, 0))
        return picked

    core.scheduler.schedule = observed_schedule
    records: list[StepRecord] = []
    prof = None
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile

        cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        prof = profile(activities=[ProfilerActivity.CPU] + cuda)
        prof.__enter__()
    last = time.perf_counter()
    while core.has_work():
        core.step()
        now = time.perf_counter()
        if prof is not None and len(records) + 1 == profile_steps:
            core.drain()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            print(f"kernels of the first {profile_steps} steps:")
            print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))
            print(f"host time of the first {profile_steps} steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
            prof = None
        prompt, decode, kv = scheduled[-1] if scheduled else (0, 0, 0)
        records.append(StepRecord(now - last, prompt, decode, kv))
        last = time.perf_counter()
    core.scheduler.schedule = schedule
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: 256 on cuda, 16 on cpu")
    ap.add_argument("--min-len", type=int, default=None, help="default: 100 on cuda, 16 on cpu")
    ap.add_argument("--max-len", type=int, default=None, help="default: 1024 on cuda, 64 on cpu")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--attention-backend", default=None, help="torch | triton | flashinfer")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=0, help="profile the first N steps (prompt work)")
    ap.add_argument("--show-steps", type=int, default=0, help="print the first N steps one by one")
    args = ap.parse_args()

    import argparse as _a

    from examples.offline_throughput import model_dir
    from rollout.config import EngineConfig
    from rollout.engine.core import EngineCore
    from rollout.engine.request_validation import make_add_request
    from rollout.testing.benchmark import Workload, measure_copy_bandwidth, model_weight_bytes

    gpu = args.device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    num = args.num_prompts or (256 if gpu else 16)
    lo, hi = args.min_len or (100 if gpu else 16), args.max_len or (1024 if gpu else 64)
    path = model_dir(_a.Namespace(model=None, shape=args.shape, dtype=dtype))
    options = dict(device=args.device, dtype=dtype, max_running_requests=args.max_running_requests,
                   overlap_schedule=not args.no_overlap)
    if args.shape != "tiny":
        options["load_format"] = "dummy"
    if args.attention_backend or gpu:
        options["attention_backend"] = args.attention_backend or "triton"
    core = EngineCore(EngineConfig.build(path, **options))
    vocab = core.limits.vocab_size

    def add(wl: Workload, prefix: str) -> None:
        for i, (prompt, sp) in enumerate(zip(wl.prompts, wl.sampling_params(args.temperature))):
            core.add(make_add_request(f"{prefix}{i}", input_ids=prompt, text=None, sampling=sp, limits=core.limits,
                                      tokenizer=None, return_logprob=True, return_raw_logprob=False,
                                      top_logprobs_num=0, stream=True))

    add(Workload.random(2, 16, 32, 8, 16, vocab, seed=1), "warm")  # as offline_throughput's warm-up
    record_steps(core)
    wl = Workload.random(num, lo, hi, lo, hi, vocab, seed=0)
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    add(wl, "r")
    records = record_steps(core, args.profile_steps)
    if gpu:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    out_tokens = sum(wl.output_lens)
    retractions = core.scheduler.num_retractions

    cfg = core.config.model
    itemsize = 2 if gpu else 4
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    weights = model_weight_bytes(cfg, itemsize)
    bw = measure_copy_bandwidth(args.device) if gpu else None

    def row(label: str, steps: list[StepRecord]) -> str:
        if not steps:
            return f"{label:<26}{0:>7}"
        secs = sum(s.seconds for s in steps)
        toks = sum(s.decode_seqs for s in steps)
        prompt = sum(s.prompt_tokens for s in steps)
        line = (f"{label:<26}{len(steps):>7}{secs:>9.3f}{secs / total:>7.1%}{secs / len(steps) * 1e3:>9.2f}"
                f"{prompt:>9}{toks:>9}{toks / secs if secs else 0:>11,.0f}")
        if bw:
            ideal = sum(weights + s.kv_tokens * kv_per_token for s in steps) / bw
            line += f"{ideal:>9.3f}{ideal / secs:>7.1%}"
        return line

    print(f"{args.shape}, {num} requests, lengths [{lo}, {hi}], {args.device}, overlap "
          f"{'off' if args.no_overlap else 'on'}: {total:.2f} s, {out_tokens:,} output tokens, "
          f"{out_tokens / total:,.0f} output tok/s, {len(records)} steps, {retractions} retractions")
    if bw:
        print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s; weights {weights / 1e9:.2f} GB; "
              f"KV {kv_per_token / 1024:.0f} KiB/token")
    head = f"{'steps':<26}{'count':>7}{'s':>9}{'share':>7}{'ms/step':>9}{'prompt':>9}{'decoded':>9}{'dec tok/s':>11}"
    print(head + (f"{'ideal s':>9}{'of it':>7}" if bw else ""))
    print(row("with prompt work", [s for s in records if s.prompt_tokens]))
    for a, b in BANDS:
        band = [s for s in records if not s.prompt_tokens and a <= s.decode_seqs <= b]
        if band:
            print(row(f"decode, batch {a}-{b}" if b < 1 << 30 else f"decode, batch {a}+", band))
    print(row("idle (nothing scheduled)", [s for s in records if not s.prompt_tokens and not s.decode_seqs]))
    print(row("all", records))
    for i, r in enumerate(records[:args.show_steps]):
        print(f"step {i:4d}: {r.seconds * 1e3:8.2f} ms  prompt tokens {r.prompt_tokens:6d}  decode {r.decode_seqs:4d}  "
              f"KV tokens {r.kv_tokens}")
    core.shutdown()
    core.close()


if __name__ == "__main__":
    main()
