"""Offline generation throughput and batch-1 latency of the in-process engine.

The standard shape (nano-vllm's bench.py, also used by mini-sglang): 256 requests of random token
ids, input and output lengths uniform in [100, 1024] (seed 0), temperature 0.6, ignore_eos; output
tokens over wall time including prefill. Every request streams, so TTFT and ITL come out too.
``--generate`` instead hands the whole batch to ``Engine.generate``, which returns each sample once
it finishes (what nano-vllm's bench.py and vLLM's ``LLM.generate`` time): no per-token hand-over to
a consumer, and no TTFT or ITL.

    python examples/offline_throughput.py                          # embedded default model, CPU-sized
    python examples/offline_throughput.py --shape qwen3-0.6b --device cuda --dtype bfloat16 \
        --num-prompts 256 --min-len 100 --max-len 1024             # the ANCHORS workload
    python examples/offline_throughput.py --batch1 --input-len 128 --output-len 512 ...
    python examples/offline_throughput.py --shape qwen3-30b-a3b --num-prompts 256 --input-len 1000 \
        --output-len 2000                                          # the MoE anchor (one H200)
    ... --return-routed-experts                                    # the same, with every request's routing
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import tempfile
import time

import torch

from rollout import Engine
from rollout.errors import InvalidArgumentError
from rollout.testing.benchmark import MODEL_SHAPES, RequestRecord, Workload, format_report, run_streams, summarize


def model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if args.shape == "tiny":
        from rollout.default_model import default_model_path

        return default_model_path()
    from rollout.testing.random_model import write_random_model

    shape = dict(MODEL_SHAPES[args.shape])
    arch = shape.pop("arch")
    path = os.path.join(tempfile.gettempdir(), f"rollout-bench-{args.shape}-{args.dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        # Config and tokenizer only: the engine fills random weights in place (load_format="dummy").
        write_random_model(path, arch, dtype=args.dtype, write_weights=False, **shape)
    return path


async def run_workload(engine: Engine, wl: Workload, temperature: float, progress: str | None = None,
                       routed_experts: bool = False) -> tuple[list[RequestRecord], float]:
    # The same streams, each also asking for its routing: the one difference between the two runs.
    stream = functools.partial(engine.async_stream, return_routed_experts=routed_experts)
    return await run_streams(stream, wl.prompts, wl.sampling_params(temperature), progress=progress)


def run_generate(engine: Engine, wl: Workload, temperature: float) -> tuple[list[RequestRecord], float]:
    """The workload as one ``Engine.generate`` call: each record has its token count and no arrival
    times, so TTFT and ITL come out empty rather than made up."""
    t0 = time.perf_counter()
    outs = engine.generate(wl.prompts, wl.sampling_params(temperature))
    duration = time.perf_counter() - t0
    return [RequestRecord(start=t0, prompt_tokens=len(p), chunk_tokens=[len(o.output_ids)])
            for p, o in zip(wl.prompts, outs)], duration


def print_roofline(path: str, args: argparse.Namespace, wl: Workload, figures: dict) -> None:
    """The memory roofline of decode for this model shape and workload, and the fraction reached.

    A decode step reads every weight once and the KV of every running sequence; with the whole
    workload running at once, the mean context of a step is the mean of input + output / 2.
    """
    from rollout.config import ModelConfig
    from rollout.testing.benchmark import decode_roofline_tok_s, measure_copy_bandwidth, model_weight_bytes

    cfg = ModelConfig.from_pretrained(path)
    itemsize = 2 if args.dtype in ("bfloat16", "float16") else 4
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    batch = min(len(wl.prompts), args.max_running_requests)
    ctx = sum(len(p) + o / 2 for p, o in zip(wl.prompts, wl.output_lens)) / len(wl.prompts)
    bw = measure_copy_bandwidth(args.device)
    roof = decode_roofline_tok_s(weight_bytes=model_weight_bytes(cfg, itemsize), kv_bytes_per_token=kv_per_token,
                                 batch=batch, mean_context=ctx, bandwidth_bytes_s=bw)
    print(f"{'Measured copy bandwidth (TB/s)':<34}{bw / 1e12:>14.2f}")
    print(f"{'Decode memory roofline (tok/s)':<34}{roof:>14.1f}   batch {batch}, mean context {ctx:.0f}, "
          f"KV {kv_per_token / 1024:.0f} KiB/token")
    print(f"{'Fraction of roofline reached':<34}{figures['output_throughput'] / roof:>14.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: a random model of --shape)")
    ap.add_argument("--shape", default="tiny", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: 256 on cuda, 16 on cpu")
    ap.add_argument("--min-len", type=int, default=None, help="default: 100 on cuda, 16 on cpu")
    ap.add_argument("--max-len", type=int, default=None, help="default: 1024 on cuda, 64 on cpu")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--batch1", action="store_true", help="one request at a time: latency mode")
    ap.add_argument("--input-len", type=int, default=None,
                    help="fixed input length (batch-1 default 128; throughput default: --min-len..--max-len)")
    ap.add_argument("--output-len", type=int, default=None,
                    help="fixed output length (batch-1 default 512; throughput default: --min-len..--max-len)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before timing")
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    ap.add_argument("--chunked-prefill-size", type=int, default=None, help="longest prompt chunk per step")
    ap.add_argument("--kv-memory-fraction", type=float, default=None, help="share of free GPU memory for KV")
    ap.add_argument("--page-size", type=int, default=None, help="KV token slots per page (default: the engine's)")
    ap.add_argument("--attention-backend", default=None, help="torch | triton | flashinfer (default: engine's)")
    ap.add_argument("--tp-size", type=int, default=None, help="tensor-parallel ranks (GPUs from --device on)")
    ap.add_argument("--ep-size", type=int, default=None, help="expert-parallel ranks (MoE shapes)")
    ap.add_argument("--deterministic", action="store_true", help="batch-invariant kernels (Engine deterministic=True)")
    ap.add_argument("--return-routed-experts", action="store_true",
                    help="MoE models: record the routing (Engine enable_return_routed_experts=True) and ask every "
                         "request for it (return_routed_experts=True), to measure what it costs")
    ap.add_argument("--generate", action="store_true",
                    help="one Engine.generate call for the whole batch instead of a stream per request")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--separate-process", action="store_true",
                    help="engine loop in its own process (no GIL shared with the streams' consumer)")
    args = ap.parse_args()
    if args.generate and (args.batch1 or args.return_routed_experts):
        ap.error("--generate times the batch as a whole: not with --batch1 or --return-routed-experts")
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    num = args.num_prompts or (256 if gpu else 16)
    lo, hi = args.min_len or (100 if gpu else 16), args.max_len or (1024 if gpu else 64)

    path = model_dir(args)
    options = dict(device=args.device, dtype=args.dtype, max_running_requests=args.max_running_requests,
                   separate_process=args.separate_process, deterministic=args.deterministic)
    if args.attention_backend:
        options["attention_backend"] = args.attention_backend
    if args.return_routed_experts:
        options["enable_return_routed_experts"] = True
    for name in ("max_num_batched_tokens", "chunked_prefill_size", "kv_memory_fraction", "page_size", "tp_size",
                 "ep_size"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if not args.model and args.shape != "tiny":
        options["load_format"] = "dummy"
    try:
        engine = Engine(path, **options)
    except InvalidArgumentError as e:  # an option this model cannot take (--return-routed-experts on a dense one)
        ap.error(str(e))
    vocab = engine.limits.vocab_size
    if args.batch1:
        n_in, n_out = args.input_len or 128, args.output_len or 512
        wl = Workload.random(1, n_in, n_in, n_out, n_out, vocab, seed=0)
    else:
        in_lo, in_hi = (args.input_len, args.input_len) if args.input_len else (lo, hi)
        out_lo, out_hi = (args.output_len, args.output_len) if args.output_len else (lo, hi)
        wl = Workload.random(num, in_lo, in_hi, out_lo, out_hi, vocab, seed=0)
    warm = Workload.random(args.warmup, 16, 32, 8, 16, vocab, seed=1)
    routed = args.return_routed_experts
    asyncio.run(run_workload(engine, warm, args.temperature, routed_experts=routed))
    if args.generate:
        records, duration = run_generate(engine, wl, args.temperature)
    else:
        records, duration = asyncio.run(run_workload(engine, wl, args.temperature, progress="benchmark",
                                                     routed_experts=routed))
    figures = summarize(records, duration)
    if args.batch1:
        figures["ms_per_token"] = figures["mean_itl_ms"]
    engine.shutdown()
    title = (f"{'batch-1 latency' if args.batch1 else 'offline throughput'}: {args.shape if not args.model else path}"
             f", {args.dtype}, {args.device}, temperature {args.temperature}, ignore_eos, warm-up {args.warmup}"
             f"{', deterministic' if args.deterministic else ''}{', routed experts' if routed else ''}"
             f"{', one Engine.generate call' if args.generate else ''}")
    print(format_report(title, {"in-process": figures}))
    if args.batch1:
        print(f"{'Decode ms per token (mean ITL)':<34}{figures['ms_per_token']:>14.3f}")
    if gpu:
        print_roofline(path, args, wl, figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
