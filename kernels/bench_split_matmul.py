"""Linear layers at tens to hundreds of rows: cuBLAS against the split-K kernel's configs.

    python -m kernels.bench_split_matmul                       # Qwen3-0.6B and Llama-3.1-8B shapes
    python -m kernels.bench_split_matmul --rows 64,256 --json timings.json

Each figure is one call's time inside a CUDA graph of back-to-back calls over enough copies of
the weight to overflow the L2 (``rollout.layers.skinny``'s timing, what a decode step sees). Per
shape and row count: cuBLAS, the two fastest split-K configs, and whether the fastest matches
cuBLAS's result to bf16 rounding. Last, per model shape and row count, the four projections of
every layer with cuBLAS alone and with the faster of the two per projection.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from kernels.bench_gemv import SHAPES
from kernels.split_matmul import SplitConfig, split_matmul, tiles

TILES = (  # (block_m, block_n, block_k, warps, stages)
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (64, 64, 128, 4, 3),
)
SPLITS = (1, 2, 3, 4, 6, 8)


def configs(m: int, n: int, k: int, sms: int) -> list[SplitConfig]:
    """Every tile and slice count whose programs number at most four per SM and whose slices
    hold at least two K tiles."""
    out = []
    for t, s in itertools.product(TILES, SPLITS):
        cfg = SplitConfig(*t, s)
        if s > 1 and (tiles(m, n, cfg) * s > 4 * sms or k // (cfg.block_k * s) < 2):
            continue
        out.append(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen3-0.6b,llama-8b")
    ap.add_argument("--rows", default="17,24,32,48,64,96,128,192,256,384,512")
    ap.add_argument("--json", default="", help="write every timing here")
    args = ap.parse_args()
    import triton

    from rollout.layers.skinny import _per_call_ms, _weight_copies

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows_list = [int(r) for r in args.rows.split(",")]
    records, totals = [], []
    print(f"{'shape':<12}{'N x K':>13}{'rows':>5}{'cuBLAS us':>10}{'best us':>9}{'gain':>7}  best / runner-up  (match)")
    for name in args.shapes.split(","):
        layers, mats = SHAPES[name]
        for rows in rows_list:
            step_cublas = step_best = 0.0
            for n, k in mats:
                w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
                weights = _weight_copies(w)
                cublas = _per_call_ms(lambda ww, x=x: F.linear(x, ww), weights) * 1e3
                timed = []
                for c in configs(rows, n, k, sms):
                    try:
                        ms = _per_call_ms(lambda ww, c=c, x=x: split_matmul(x, ww, None, c), weights)
                        timed.append((ms * 1e3, c))
                    except triton.runtime.errors.OutOfResources:
                        continue
                timed.sort()
                best_us, best = timed[0]
                ref = F.linear(x, w).float()
                err = (split_matmul(x, w, None, best).float() - ref).abs().max().item()
                match = err <= 2 * ref.abs().max().item() * 2**-8
                # The count buffer zeroed by the graph on every call (a memset node) instead of kept zero.
                zeroed = _per_call_ms(lambda ww, x=x, c=best: split_matmul(
                    x, ww, None, c, torch.zeros(4096, dtype=torch.int32, device=dev)), weights) * 1e3
                step_cublas += cublas * layers
                step_best += min(cublas, best_us) * layers
                picks = " / ".join(f"{tuple(c)} {us:.1f}" for us, c in timed[:2])
                print(f"{name:<12}{f'{n} x {k}':>13}{rows:>5}{cublas:>10.1f}{best_us:>9.1f}{cublas / best_us:>6.2f}x"
                      f"  {picks}  ({'ok' if match else f'MISMATCH {err:.3g}'}; zeroed counts {zeroed:.1f})")
                records.append({"shape": name, "n": n, "k": k, "rows": rows, "cublas_us": cublas, "zeroed_us": zeroed,
                                "split": [[us, list(c)] for us, c in timed]})
                del weights, w
            totals.append((name, rows, step_cublas, step_best))
    print("\nlinear layers of one decode step (all layers, LM head excluded), us")
    print(f"{'shape':<12}{'rows':>6}{'cuBLAS':>10}{'best':>10}{'speed-up':>10}")
    for name, rows, c, b in totals:
        print(f"{name:<12}{rows:>6}{c:>10.0f}{b:>10.0f}{c / b:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    main()
