"""Speculative decoding throughput against plain decoding, by batch size.

Llama-3.1-8B shape with random weights (``load_format="dummy"``), a prompt of ``--input-len``
random ids per sequence, ``--output-len`` greedy tokens each, for every batch size in
``--batch-sizes``. Methods: ``none`` (plain decoding), ``oracle`` (benchmarks only: each draft is
taken with probability ``--acceptance`` given the ones before it, so it measures what a drafter of
that acceptance rate would give, at zero drafting cost; its output is NOT the target's
distribution), ``ngram`` (prompts built from a repeated random block so lookups find matches).

    python examples/spec_bench.py --device cuda --dtype bfloat16 --batch-sizes 1,2,4,8,16,32,64,128 \
        --methods none,oracle,ngram --acceptance 0.6,0.8 --num-draft-tokens 4

Prints one line per (method, acceptance, batch size): output tokens/s and the speed-up over plain.
Adaptive speculation turns drafts off above ``--max-spec-batch`` sequences.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

from rollout import Engine, SamplingParams
from rollout.testing.benchmark import MODEL_SHAPES


def model_dir(shape_name: str, dtype: str) -> str:
    from rollout.testing.random_model import write_random_model

    shape = dict(MODEL_SHAPES[shape_name])
    arch = shape.pop("arch")
    path = os.path.join(tempfile.gettempdir(), f"rollout-spec-bench-{shape_name}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_random_model(path, arch, dtype=dtype, write_weights=False, **shape)
    return path


def prompts(n: int, length: int, repeat: bool, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if repeat:  # a block of 32 ids over and over: n-gram lookups have something to find
            block = [rng.randrange(10, 30000) for _ in range(32)]
            out.append((block * (length // 32 + 1))[:length])
        else:
            out.append([rng.randrange(10, 30000) for _ in range(length)])
    return out


def run(path: str, args: argparse.Namespace, bs: int, options: dict) -> tuple[float, float | None]:
    """Output tokens/s, and the mean accepted length (tokens per target forward per sequence
    while speculating; None without speculation)."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.output_len, ignore_eos=True)
    ps = prompts(bs, args.input_len, repeat=options.get("speculative_method") == "ngram")
    with Engine(path, device=args.device, dtype=args.dtype, load_format="dummy",
                max_running_requests=max(bs, 1), **options) as engine:
        engine.generate(ps[:1], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))  # warm up
        t = time.perf_counter()
        before = engine.info()
        outs = engine.generate(ps, sp)
        dt = time.perf_counter() - t
        after = engine.info()
    verified = after.spec_verified - before.spec_verified
    accepted = after.spec_accepted - before.spec_accepted
    return sum(len(o.output_ids) for o in outs) / dt, (1 + accepted / verified) if verified else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--methods", default="none,oracle,ngram")
    ap.add_argument("--acceptance", default="0.6,0.8", help="oracle acceptance probabilities")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--max-spec-batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    path = model_dir(args.shape, args.dtype)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    plain: dict[int, float] = {}
    for method in args.methods.split(","):
        rates = [float(a) for a in args.acceptance.split(",")] if method == "oracle" else [None]
        for acc in rates:
            for bs in sizes:
                options: dict = {}
                if method != "none":
                    options = dict(speculative_method=method, num_draft_tokens=args.num_draft_tokens,
                                   speculative_max_batch_size=args.max_spec_batch)
                    if acc is not None:
                        options["oracle_acceptance"] = acc
                tok_s, accept_len = run(path, args, bs, options)
                if method == "none":
                    plain[bs] = tok_s
                speedup = f"{tok_s / plain[bs]:.2f}x" if bs in plain else "-"
                label = method if acc is None else f"{method}(a={acc})"
                length = f"{accept_len:.2f}" if accept_len is not None else "-"
                print(f"{label:16s} bs={bs:4d}  {tok_s:10.1f} tok/s  vs plain {speedup}  "
                      f"accepted length {length}", flush=True)


if __name__ == "__main__":
    main()
