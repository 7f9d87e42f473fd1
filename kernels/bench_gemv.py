"""Linear layers at a few rows: cuBLAS against every skinny-kernel config, per weight shape.

    python -m kernels.bench_gemv                          # Qwen3-0.6B and Llama-3.1-8B shapes
    python -m kernels.bench_gemv --shapes qwen3-0.6b --rows 1,4,16
    python -m kernels.bench_gemv --shapes llama-8b --rows 1 --configs fma:4/2048/8/2,fma:8/4096/8/1,32/512/8/3

Each figure is one call's time inside a CUDA graph of back-to-back calls over enough copies of
the weight to overflow the L2 (``rollout.layers.skinny``, the timing the engine chooses by), and
the weight-read bandwidth it implies. Last, per model shape and row count, the linear layers of
one decode step (every layer's four projections) with cuBLAS alone and with the chosen kernels.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

# name -> (layers, [(N, K) of qkv, o_proj, gate_up, down])
SHAPES = {
    "qwen3-0.6b": (28, [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]),
    "llama-8b": (32, [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen3-0.6b,llama-8b")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--configs", default="", help="more configs to time beside the candidates: "
                    "block_n/block_k/warps/stages, prefixed fma: for the CUDA-core kernel")
    ap.add_argument("--top", type=int, default=2, help="fastest configs listed per shape")
    args = ap.parse_args()
    import triton

    from kernels.gemv import FMA_MAX_ROWS, GemvConfig, candidates, gemv
    from rollout.layers.skinny import _per_call_ms, _weight_copies

    dev = torch.device("cuda")
    rows_list = [int(r) for r in args.rows.split(",")]
    extra = [GemvConfig(*(int(v) for v in c.removeprefix("fma:").split("/")), c.startswith("fma:"))
             for c in args.configs.split(",") if c]
    totals: list[tuple[str, int, float, float]] = []
    print(f"{'shape':<12}{'N x K':>14}{'rows':>6}{'cuBLAS us':>11}{'TB/s':>7}{'best us':>10}{'TB/s':>7}"
          "  best / runner-up")
    for name in args.shapes.split(","):
        layers, mats = SHAPES[name]
        for rows in rows_list:
            step_cublas = step_best = 0.0
            for n, k in mats:
                w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
                weights = _weight_copies(w)
                gb = n * k * 2 / 1e9
                cublas = _per_call_ms(lambda ww, x=x: F.linear(x, ww), weights) * 1e3
                timed = []
                for c in dict.fromkeys(candidates(rows) + tuple(c for c in extra if rows <= FMA_MAX_ROWS or not c.fma)):
                    try:
                        timed.append((_per_call_ms(lambda ww, c=c, x=x: gemv(x, ww, None, c), weights) * 1e3, c))
                    except triton.runtime.errors.OutOfResources:
                        continue
                timed.sort()
                best_us = min(cublas, timed[0][0]) if timed else cublas
                step_cublas += cublas * layers
                step_best += best_us * layers
                picks = " / ".join(f"{tuple(c)} {us:.1f}" for us, c in timed[:args.top])
                print(f"{name:<12}{f'{n} x {k}':>14}{rows:>6}{cublas:>11.1f}{gb / cublas * 1e3:>7.2f}"
                      f"{best_us:>10.1f}{gb / best_us * 1e3:>7.2f}  {picks}")
                del weights, w
            totals.append((name, rows, step_cublas, step_best))
    print("\nlinear layers of one decode step (all layers, LM head excluded), us")
    print(f"{'shape':<12}{'rows':>6}{'cuBLAS':>10}{'chosen':>10}{'speed-up':>10}")
    for name, rows, c, b in totals:
        print(f"{name:<12}{rows:>6}{c:>10.0f}{b:>10.0f}{c / b:>9.2f}x")


if __name__ == "__main__":
    main()
