"""One RL rollout step as a benchmark: GRPO groups, a shared system prefix, a long tail of lengths.

``--prompts`` prompts x ``--samples`` samples (128 x 8 on GPU). Every prompt is a system prefix of
``--prefix-len`` tokens shared by all prompts, then ``--prompt-len`` tokens of its own. Temperature
1, logprobs of the sampled tokens on, every sample submitted at once and streamed.

Output lengths: each sample's length is drawn once from ``--seed``, log-normal with median
``--median-new-tokens`` and shape ``--sigma``, capped at ``--max-new-tokens`` (8192 on GPU), with
the longest draw set to the cap. With the GPU defaults (median 300, sigma 1.2) most samples end
within a few hundred tokens and a few run to 8192. Random weights cannot be told when to emit an
end-of-sequence token, so each sample is a request of its own whose ``max_new_tokens`` is its drawn
length, with ``ignore_eos``: requests leave the batch at different steps, the batch shrinks to a
small tail that decodes alone to the cap, as in a real step (see ``rollout/testing/rollout_workload.py``).

The step runs twice on fresh engines, with the prefix cache on and off, so the gain of sharing the
prefix (and each prompt across its samples) shows. Figures, per run: makespan (submission to the
last sample's end), output tok/s over the makespan, the tail (time from when all but the last 10%
of samples had finished to the end), the prefix-cache hit rate (cached prompt tokens the engine
reports over all prompt tokens) beside the best a perfect cache could do, TTFT and ITL percentiles
from the streams' chunk arrival times (all samples are submitted at t = 0, so TTFT includes
queueing). A short table comes last.

    python examples/rollout_bench.py --quick                        # CPU, tiny model, seconds
    python examples/rollout_bench.py --shape qwen3-0.6b --attention-backend triton   # one GPU
    python examples/rollout_bench.py --shape qwen3-0.6b --prompts 64 --samples 8 --prefix-len 512 \
        --prompt-len 512 --max-new-tokens 4096                      # the ANCHORS GRPO-shaped step
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import tempfile
from typing import Any

import torch

from rollout import Engine
from rollout.testing.benchmark import MODEL_SHAPES
from rollout.testing.rollout_workload import RolloutWorkload, run_rollout, summarize_rollout

RUNS = {"cache on": True, "cache off": False}

ROWS = [  # (key, label, format): the harness rows of ANCHORS.md, then the rollout ones
    ("successful_requests", "Successful requests", "{:.0f}"),
    ("duration_s", "Benchmark duration (s)", "{:.2f}"),
    ("total_input_tokens", "Total input tokens", "{:.0f}"),
    ("total_output_tokens", "Total generated tokens", "{:.0f}"),
    ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
    ("input_throughput", "Input token throughput (tok/s)", "{:.1f}"),
    ("output_throughput", "Output token throughput (tok/s)", "{:.1f}"),
    ("total_throughput", "Total token throughput (tok/s)", "{:.1f}"),
    ("mean_ttft_ms", "Mean TTFT (ms)", "{:.2f}"),
    ("p50_ttft_ms", "Median TTFT (ms)", "{:.2f}"),
    ("p90_ttft_ms", "P90 TTFT (ms)", "{:.2f}"),
    ("p99_ttft_ms", "P99 TTFT (ms)", "{:.2f}"),
    ("mean_itl_ms", "Mean ITL (ms)", "{:.2f}"),
    ("p50_itl_ms", "Median ITL (ms)", "{:.2f}"),
    ("p90_itl_ms", "P90 ITL (ms)", "{:.2f}"),
    ("p99_itl_ms", "P99 ITL (ms)", "{:.2f}"),
    ("makespan_s", "Makespan (s)", "{:.3f}"),
    ("tail_s", "Tail: last 10% of samples (s)", "{:.3f}"),
    ("tail_share", "Tail share of makespan", "{:.1%}"),
    ("tail_tokens", "Tokens generated in the tail", "{:.0f}"),
    ("cached_tokens", "Cached prompt tokens", "{:.0f}"),
    ("prefix_hit_rate", "Prefix-cache hit rate", "{:.1%}"),
    ("best_hit_rate", "Best possible hit rate", "{:.1%}"),
    ("kv_total_tokens", "KV pool (tokens)", "{:.0f}"),
]


def model_dir(shape: str, dtype: str) -> str:
    """The embedded default model for ``tiny``; otherwise config + tokenizer of ``shape`` (random weights)."""
    if shape == "tiny":
        from rollout.default_model import default_model_path

        return default_model_path()
    from rollout.testing.random_model import write_random_model

    spec = dict(MODEL_SHAPES[shape])
    arch = spec.pop("arch")
    path = os.path.join(tempfile.gettempdir(), f"rollout-bench-{shape}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_random_model(path, arch, dtype=dtype, write_weights=False, **spec)
    return path


def run_one(path: str, options: dict[str, Any], workload: RolloutWorkload, prefix_cache: bool,
            warmup: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Build an engine, warm it up, run the step, check the cache's integrity, shut it down."""
    engine = Engine(path, enable_prefix_cache=prefix_cache, **options)
    try:
        vocab = engine.limits.vocab_size
        if warmup:
            warm = RolloutWorkload.build(num_prompts=warmup, samples=2, prefix_len=8, prompt_len=16,
                                         max_new_tokens=16, median_new_tokens=8, sigma=0.5, vocab=vocab,
                                         seed=workload.seed + 1)
            asyncio.run(run_rollout(engine, warm, id_prefix="warm-"))
            engine.flush_cache()
        records, t0 = asyncio.run(run_rollout(engine, workload))
        engine.check_integrity()  # no KV slot leaked over the step
        figures = summarize_rollout(records, t0, workload, page_size=options.get("page_size", 1))
        figures["kv_total_tokens"] = engine.info().kv_total_tokens
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next engine sizes its KV pool from free memory
    for r in records:
        if r.error:
            print(f"sample {r.request_id} failed: {r.error}")
    samples = [dict(id=r.request_id, target=r.target_len, completion_tokens=r.completion_tokens,
                    streamed_tokens=r.output_tokens, logprobs=len(r.logprobs), cached_tokens=r.cached_tokens,
                    finish_reason=r.finish_reason.value if r.finish_reason else None,
                    finish_s=None if r.finish_time is None else r.finish_time - t0) for r in records]
    return figures, samples


def fmt(value: float, spec: str) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else spec.format(value)


def report(title: str, columns: dict[str, dict[str, float]]) -> str:
    """The full side-by-side table: harness rows, then the rollout rows."""
    lines = [f"{'=' * 20} {title} {'=' * 20}", f"{'':<34}" + "".join(f"{n:>14}" for n in columns)]
    for key, label, spec in ROWS:
        lines.append(f"{label:<34}" + "".join(f"{fmt(c.get(key, float('nan')), spec):>14}" for c in columns.values()))
    return "\n".join(lines)


def short_table(on: dict[str, float], off: dict[str, float]) -> str:
    """The summary printed last: the figures that matter for a rollout step, and on/off ratios."""
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    rows = [
        ("makespan (s)", f"{on['makespan_s']:.3f}", f"{off['makespan_s']:.3f}",
         ratio(off["makespan_s"], on["makespan_s"]) + " faster"),
        ("output tok/s", f"{on['output_throughput']:.1f}", f"{off['output_throughput']:.1f}",
         ratio(on["output_throughput"], off["output_throughput"])),
        ("tail, last 10% (s)", f"{on['tail_s']:.3f}", f"{off['tail_s']:.3f}", ""),
        ("prefix-cache hit rate", f"{on['prefix_hit_rate']:.1%}", f"{off['prefix_hit_rate']:.1%}",
         f"best {on['best_hit_rate']:.1%}"),
        ("TTFT p50 / p99 (ms)", f"{on['p50_ttft_ms']:.1f} / {on['p99_ttft_ms']:.1f}",
         f"{off['p50_ttft_ms']:.1f} / {off['p99_ttft_ms']:.1f}", ""),
        ("ITL p50 / p99 (ms)", f"{on['p50_itl_ms']:.2f} / {on['p99_itl_ms']:.2f}",
         f"{off['p50_itl_ms']:.2f} / {off['p99_itl_ms']:.2f}", ""),
    ]
    head = f"{'rollout step':<24}{'cache on':>18}{'cache off':>18}   on vs off"
    return "\n".join([head, "-" * len(head)] + [f"{a:<24}{b:>18}{c:>18}   {d}" for a, b, c, d in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, choices=sorted(MODEL_SHAPES),
                    help="model shape with random weights (default: qwen3-0.6b on cuda, tiny on cpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="a few-second CPU-sized step (tiny model, 4 x 4)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (128; quick: 4)")
    ap.add_argument("--samples", type=int, default=None, help="samples per prompt, a GRPO group (8; quick: 4)")
    ap.add_argument("--prefix-len", type=int, default=None, help="shared system prefix tokens (512; quick: 24)")
    ap.add_argument("--prompt-len", type=int, default=None, help="each prompt's own tokens (512; quick: 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="the cap of output lengths (8192; quick: 24)")
    ap.add_argument("--median-new-tokens", type=float, default=None, help="median output length (300; quick: 4)")
    ap.add_argument("--sigma", type=float, default=1.2, help="log-normal shape of output lengths")
    ap.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and sampling")
    ap.add_argument("--attention-backend", default=None, help="torch | triton | flashinfer (default: engine's)")
    ap.add_argument("--max-running-requests", type=int, default=None, help="default: the engine's")
    ap.add_argument("--page-size", type=int, default=None, help="KV page size (default: the engine's)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up prompts before each run (4; quick: 1)")
    ap.add_argument("--only", choices=sorted(RUNS), help="run one of the two configurations")
    ap.add_argument("--json", help="also write figures, the drawn lengths and per-sample results here")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda") and not args.quick
    defaults = dict(prompts=128, samples=8, prefix_len=512, prompt_len=512, max_new_tokens=8192,
                    median_new_tokens=300, warmup=4, shape="qwen3-0.6b")
    if not gpu:
        defaults = dict(prompts=4, samples=4, prefix_len=24, prompt_len=8, max_new_tokens=24,
                        median_new_tokens=4, warmup=1, shape="tiny")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.device = "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    path = model_dir(args.shape, args.dtype)
    options: dict[str, Any] = dict(device=args.device, dtype=args.dtype, seed=args.seed)
    for key in ("attention_backend", "max_running_requests", "page_size"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.shape != "tiny":
        options["load_format"] = "dummy"
    from rollout.config import ModelConfig

    vocab = ModelConfig.from_pretrained(path).vocab_size
    workload = RolloutWorkload.build(
        num_prompts=args.prompts, samples=args.samples, prefix_len=args.prefix_len, prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens, median_new_tokens=args.median_new_tokens, sigma=args.sigma,
        vocab=vocab, seed=args.seed)
    lens = sorted(x for row in workload.output_lens for x in row)
    at_cap = sum(x == args.max_new_tokens for x in lens)
    print(f"workload: {args.prompts} prompts x {args.samples} samples, prompt {args.prefix_len} shared + "
          f"{args.prompt_len} own tokens; output lengths median {lens[len(lens) // 2]}, p90 "
          f"{lens[int(0.9 * (len(lens) - 1))]}, max {lens[-1]} ({at_cap} at the cap), total {sum(lens)}")
    columns: dict[str, dict[str, float]] = {}
    per_sample: dict[str, list[dict[str, Any]]] = {}
    for name, on in RUNS.items():
        if args.only and name != args.only:
            continue
        columns[name], per_sample[name] = run_one(path, options, workload, on, args.warmup)
    title = (f"rollout step: {args.shape}, {args.dtype}, {args.device}, temperature 1, logprobs on, "
             f"lengths drawn (ignore_eos), warm-up {args.warmup} prompts")
    print(report(title, columns))
    if len(columns) == 2:
        print()
        print(short_table(columns["cache on"], columns["cache off"]))
    result = dict(args=vars(args), vocab=vocab, output_lens=workload.output_lens, figures=columns, samples=per_sample)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
