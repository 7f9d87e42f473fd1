"""Benchmark of deterministic mode's kernels against the default ones, on one GPU.

    python -m kernels.bench_deterministic                 # Qwen3-0.6B shapes
    python -m kernels.bench_deterministic --shape llama-8b

Matmul: ``invariant_matmul`` under each candidate tile configuration, beside cuBLAS, for the
model's linear layers at decode and prompt row counts; and whether each candidate gives the same
bits as the configuration in use (same ``block_k``, so the same order of the K sum). Attention: the
deterministic tiles (16 packed rows) for a decode step and a prompt step, against the split-KV
decode and the default extend tiles. Prints microseconds per call, best first.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench

from kernels.attention import (
    choose_max_splits,
    decode_attention,
    extend_attention,
    plan_kv_splits,
    runs_from_indptr,
    uniform_pieces,
)
from kernels.bench_attention import make_pool, paged_indices
from kernels.bench_utils import describe_device
from kernels.invariant_matmul import MatmulConfig, choose_config, invariant_matmul
from kernels.triton_utils import num_sms

# (N, K) of each linear layer: fused qkv, o, fused gate/up, down, LM head.
SHAPES = {
    "qwen3-0.6b": dict(linear=[(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)],
                       heads=(16, 8, 128)),
    "llama-8b": dict(linear=[(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
                     heads=(32, 8, 128)),
}
# The one configuration every size took before tiles were chosen by size: the baseline.
FIRST = MatmulConfig(64, 128, 64, 4, 4)
CANDIDATES = [
    MatmulConfig(64, 128, 64, 4, 4), MatmulConfig(64, 64, 64, 4, 4), MatmulConfig(64, 32, 64, 4, 4),
    MatmulConfig(64, 64, 64, 4, 6), MatmulConfig(64, 128, 64, 4, 3), MatmulConfig(128, 128, 64, 8, 3),
    MatmulConfig(128, 256, 64, 8, 3), MatmulConfig(64, 256, 64, 4, 3), MatmulConfig(128, 64, 64, 4, 4),
]


def us(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1e3


def name(c: MatmulConfig) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"


def bench_matmul(shape: str, rows: list[int], device: torch.device) -> None:
    dtype = torch.bfloat16
    current = FIRST
    same_bits = {c: True for c in CANDIDATES}
    print(f"matmul {shape}: us per call (cuBLAS | first config {name(current)} | choose_config | best)")
    for (n, k), m in itertools.product(SHAPES[shape]["linear"], rows):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        ref = invariant_matmul(x, w, config=current)
        times = {}
        for c in CANDIDATES:
            out = invariant_matmul(x, w, config=c)
            if c.block_k == current.block_k and not torch.equal(out, ref):
                same_bits[c] = False
            times[c] = us(lambda c=c, x=x, w=w: invariant_matmul(x, w, config=c))
        cublas = us(lambda x=x, w=w: x @ w.T)
        best = min(times, key=times.get)
        chosen = choose_config(m, n, dtype)
        print(f"  N={n:6d} K={k:5d} M={m:5d}  cuBLAS {cublas:8.1f}  first {times[current]:8.1f}  "
              f"chosen {times[chosen]:8.1f}  "
              f"best {times[best]:8.1f} ({name(best)})  " + " ".join(f"{times[c]:.0f}" for c in CANDIDATES))
    print("  candidates (columns above): " + "; ".join(name(c) for c in CANDIDATES))
    print("  same bits as the first: " + "; ".join(f"{name(c)} {'yes' if same_bits[c] else 'NO'}" for c in CANDIDATES))


def bench_attention(shape: str, batch: int, context: int, device: torch.device) -> None:
    dtype = torch.bfloat16
    hq, hkv, d = SHAPES[shape]["heads"]
    scale = d**-0.5
    # Decode: one new token per request after context - 1.
    lengths = [context] * batch
    kv_indices = paged_indices(lengths, 16, device)
    k_buf, v_buf = make_pool(int(kv_indices.max()) + 1, hkv, d, dtype, device)
    kv_indptr = torch.arange(0, (batch + 1) * context, context, dtype=torch.int32, device=device)
    starts, lens = runs_from_indptr(kv_indptr)
    q = torch.randn(batch, hq, d, device=device, dtype=dtype)
    qo = torch.arange(batch + 1, dtype=torch.int32, device=device)
    max_splits = choose_max_splits(batch, hkv, num_sms(device), 16)
    pieces = uniform_pieces(plan_kv_splits(lens, max_splits, 128), max_splits)
    plain = us(lambda: decode_attention(q, k_buf, v_buf, kv_indices, starts, lens, scale, pieces))
    kv_bytes = 2 * batch * context * hkv * d * 2
    print(f"attention {shape} decode B={batch} ctx={context}: split-KV decode {plain:.1f} us "
          f"({kv_bytes / plain / 1e3:.0f} GB/s of K/V)")
    _sweep(lambda **kw: extend_attention(q, k_buf, v_buf, qo, kv_indices, starts, lens, scale, 1,
                                         deterministic=True, **kw), kv_bytes)
    # A prompt step: 8 requests of 1024 new tokens.
    n, new = 8, 1024
    kv_indices = paged_indices([new] * n, 16, device, seed=1)
    k_buf, v_buf = make_pool(int(kv_indices.max()) + 1, hkv, d, dtype, device)
    qo = torch.arange(0, (n + 1) * new, new, dtype=torch.int32, device=device)
    starts, lens = runs_from_indptr(qo)
    q = torch.randn(n * new, hq, d, device=device, dtype=dtype)
    plain = us(lambda: extend_attention(q, k_buf, v_buf, qo, kv_indices, starts, lens, scale, new))
    print(f"attention {shape} prompt {n} x {new}: default extend tiles {plain:.1f} us")
    _sweep(lambda **kw: extend_attention(q, k_buf, v_buf, qo, kv_indices, starts, lens, scale, new,
                                         deterministic=True, **kw), None)


def _sweep(run, kv_bytes: int | None) -> None:
    results = []
    for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
        try:
            t = us(lambda b=block_n, w=warps, s=stages: run(block_n=b, num_warps=w, num_stages=s))
        except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory) is skipped
            print(f"    block_n={block_n} warps={warps} stages={stages}: {type(e).__name__}")
            continue
        results.append((t, f"block_n={block_n} warps={warps} stages={stages}"))
    current = us(lambda: run())
    extra = f" ({kv_bytes / current / 1e3:.0f} GB/s)" if kv_bytes else ""
    print(f"    deterministic, current tiles: {current:.1f} us{extra}")
    for t, cfg in sorted(results)[:6]:
        extra = f" ({kv_bytes / t / 1e3:.0f} GB/s)" if kv_bytes else ""
        print(f"    deterministic {cfg}: {t:.1f} us{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,64,256,2048,8192", help="matmul row counts")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=600)
    args = ap.parse_args()
    device = torch.device("cuda")
    print(describe_device(device))
    bench_attention(args.shape, args.batch, args.context, device)
    bench_matmul(args.shape, [int(r) for r in args.rows.split(",")], device)


if __name__ == "__main__":
    main()
