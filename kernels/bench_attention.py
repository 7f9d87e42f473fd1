"""Benchmark of the Triton paged attention kernels on one GPU: achieved bandwidth (decode) and
FLOP/s (extend) against the H100 limits and the copy bandwidth measured in the same run.

    python -m kernels.bench_attention                      # decode B=256 x 1024, extend 8 x 1024
    python -m kernels.bench_attention --sweep              # also try tile / warp / stage choices

Decode is memory-bound: bytes moved = K and V of every context token + their slot indices + q + out.
Extend counts 4 * head_dim FLOPs per visible (query, key) pair and head (QK^T and PV).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from kernels.attention import (
    choose_max_splits,
    decode_attention,
    decode_attention_reference,
    decode_workspace,
    extend_attention,
    paged_attention_reference,
    plan_kv_splits,
    runs_from_indptr,
    uniform_pieces,
)
from kernels.bench_utils import bandwidth_line, copy_bandwidth, describe_device, flops_line, median_ms
from kernels.triton_utils import num_sms


def paged_indices(lengths: list[int], page_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Slots of every request's tokens on shuffled pages (page 0 reserved), concatenated."""
    gen = torch.Generator().manual_seed(seed)
    pages_needed = [-(-n // page_size) for n in lengths]
    pages = torch.randperm(sum(pages_needed), generator=gen) + 1
    slots, start = [], 0
    for n, p in zip(lengths, pages_needed):
        own = pages[start : start + p, None] * page_size + torch.arange(page_size)  # (p, page_size)
        slots.append(own.reshape(-1)[:n])
        start += p
    return torch.cat(slots).to(device)


def make_pool(num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    k_buf = torch.randn(num_slots, kv_heads, head_dim, device=device, dtype=dtype)
    v_buf = torch.randn(num_slots, kv_heads, head_dim, device=device, dtype=dtype)
    return k_buf, v_buf


def bench_decode(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, copy_bps: float) -> None:
    b, ctx, hq, hkv, d = args.batch, args.context, args.q_heads, args.kv_heads, args.head_dim
    lengths = [ctx] * b
    kv_indices = paged_indices(lengths, args.page_size, device)
    k_buf, v_buf = make_pool(int(kv_indices.max()) + 1, hkv, d, dtype, device)
    kv_indptr = torch.arange(0, (b + 1) * ctx, ctx, dtype=torch.int32, device=device)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, device=device, dtype=dtype)
    scale = d**-0.5
    elt = k_buf.element_size()
    nbytes = 2 * b * ctx * hkv * d * elt + b * ctx * kv_indices.element_size() + 2 * q.numel() * elt

    starts, lens = runs_from_indptr(kv_indptr)

    def run(max_splits: int, tiles: tuple[int, int, int] | None = None) -> float:
        # As in the backend: split counts planned once per step, workspace and output preallocated.
        pieces = uniform_pieces(plan_kv_splits(seq_lens, max_splits, args.min_split_tokens), max_splits)
        mid_o, mid_lse = decode_workspace(pieces.grid, hq, d, device)
        out = torch.empty_like(q)
        return median_ms(
            lambda: decode_attention(
                q, k_buf, v_buf, kv_indices, starts, lens, scale, pieces,
                out=out, mid_o=mid_o, mid_lse=mid_lse, tiles=tiles,
            )
        )

    planned = choose_max_splits(b, hkv, num_sms(device), args.max_kv_splits)
    pieces = uniform_pieces(plan_kv_splits(seq_lens, planned, args.min_split_tokens), planned)
    out = decode_attention(q, k_buf, v_buf, kv_indices, starts, lens, scale, pieces)
    n_check = min(b, 8)
    ref = decode_attention_reference(q[:n_check], k_buf, v_buf, kv_indptr[: n_check + 1], kv_indices, scale)
    err = (out[:n_check].float() - ref.float()).abs().max().item()
    label = f"decode B={b} ctx={ctx} Hq={hq} Hkv={hkv} D={d} {args.dtype} page={args.page_size} splits<={planned}"
    print(f"{label} (max err vs reference {err:.1e})")
    print(bandwidth_line("  triton decode (split + merge)", run(planned), nbytes, copy_bps))
    if args.sweep:
        results = []
        for block_n, warps, stages, max_splits in itertools.product(
            (32, 64, 128), (4, 8), (1, 2, 3), sorted({1, 2, 4, planned})
        ):
            ms = run(max_splits, (block_n, warps, stages))
            results.append((ms, f"block_n={block_n} warps={warps} stages={stages} splits<={max_splits}"))
        for ms, cfg in sorted(results)[:5]:
            print(bandwidth_line(f"  sweep {cfg:44s}", ms, nbytes, copy_bps))


def bench_extend(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, copy_bps: float) -> None:
    n, new, prefix = args.extend_requests, args.extend_len, args.extend_prefix
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    kv_len = prefix + new
    kv_indices = paged_indices([kv_len] * n, args.page_size, device, seed=1)
    k_buf, v_buf = make_pool(int(kv_indices.max()) + 1, hkv, d, dtype, device)
    qo_indptr = torch.arange(0, (n + 1) * new, new, dtype=torch.int32, device=device)
    kv_indptr = torch.arange(0, (n + 1) * kv_len, kv_len, dtype=torch.int32, device=device)
    q = torch.randn(n * new, hq, d, device=device, dtype=dtype)
    scale = d**-0.5
    pairs = n * (new * prefix + new * (new + 1) // 2)  # visible (query, key) pairs per head
    flops = 4 * d * hq * pairs

    starts, lens = runs_from_indptr(kv_indptr)

    def run(**kw) -> float:
        return median_ms(
            lambda: extend_attention(q, k_buf, v_buf, qo_indptr, kv_indices, starts, lens, scale, new, **kw))

    out = extend_attention(q, k_buf, v_buf, qo_indptr, kv_indices, starts, lens, scale, new)
    ref = paged_attention_reference(q[:new], k_buf, v_buf, qo_indptr[:2], kv_indptr[:2], kv_indices, scale)
    err = (out[:new].float() - ref.float()).abs().max().item()
    print(f"extend {n} x {new} new tokens after {prefix} Hq={hq} Hkv={hkv} D={d} {args.dtype} (max err {err:.1e})")
    print(flops_line("  triton extend", run(), flops))
    if args.sweep:
        results = []
        for block_m, block_n, warps, stages, pack in itertools.product(
            (64, 128), (32, 64, 128), (4, 8), (2, 3), (False, True)
        ):
            try:
                ms = run(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages, pack_gqa=pack)
            except triton.runtime.errors.OutOfResources:  # tiles over the shared-memory limit
                continue
            results.append((ms, f"block_m={block_m} block_n={block_n} warps={warps} stages={stages} pack={pack:d}"))
        for ms, cfg in sorted(results)[:5]:
            print(flops_line(f"  sweep {cfg:51s}", ms, flops))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--page-size", type=int, default=16, help="pages are shuffled; 1 scatters every token")
    p.add_argument("--max-kv-splits", type=int, default=16)
    p.add_argument("--min-split-tokens", type=int, default=128)
    p.add_argument("--extend-requests", type=int, default=8)
    p.add_argument("--extend-len", type=int, default=1024)
    p.add_argument("--extend-prefix", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also time other tile / warp / stage / split choices")
    p.add_argument("--only", choices=("decode", "extend"), help="one of the two kernels")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    copy_bps = copy_bandwidth(device)
    print(describe_device(device))
    print(f"measured copy bandwidth (1 GiB device-to-device, read + write): {copy_bps / 1e12:.2f} TB/s")
    if args.only != "extend":
        bench_decode(args, device, dtype, copy_bps)
    if args.only != "decode":
        bench_extend(args, device, dtype, copy_bps)


if __name__ == "__main__":
    main()
