"""Decode attention as the engine runs it: the qkv split kernel (``decode_attention_qkv``) over a
model's layers, each with its own KV pool, replayed from one CUDA graph. Sweeps the grid depth
(pieces per request) and the tiles per batch size and context, and prints per-layer time and
bandwidth against the copy bandwidth measured in the same run.

    python -m kernels.bench_decode_graph                         # Qwen3-0.6B heads, the default sweep
    python -m kernels.bench_decode_graph --batch 17,32 --context 1000,3000
    python -m kernels.bench_decode_graph --splits 1 --tiles 64/4/3 --ragged 0.8 --interleaved --spare u,0.5,1

Unlike ``kernels.bench_attention`` (one launch timed by ``do_bench`` after an L2 flush, whose
write-back overlaps the next small kernel), consecutive layers here read distinct pools, as in a
decode step, so what one layer left in L2 does not serve the next.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from kernels.attention import (
    NewTokenRope,
    balanced_splits,
    cut_pieces,
    decode_attention_qkv,
    decode_workspace,
    plan_kv_splits,
)
from kernels.bench_utils import copy_bandwidth, describe_device

TILES = "64/4/3,64/2/3,128/4/3,64/4/5,32/4/5"  # block_n / warps / stages; the first is the baseline


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _spares(text: str) -> list[float | None]:
    return [None if x == "u" else float(x) for x in text.split(",") if x]


def _tiles(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in t.split("/")) for t in text.split(",") if t]


def request_lens(batch: int, context: int, ragged: float, long: float = 0.0) -> torch.Tensor:
    """KV lengths (B,): ``context`` each, or uniform in ``context * (1 +- ragged)`` (fixed seed);
    ``long``: that fraction of the requests (at least one if above 0) five times as long, as the
    few samples of an RL rollout step that run on to the length cap."""
    gen = torch.Generator().manual_seed(batch + context)
    if ragged <= 0:
        lens = torch.full((batch,), context, dtype=torch.int32)
    else:
        lo, hi = max(2, round(context * (1 - ragged))), round(context * (1 + ragged))
        lens = torch.randint(lo, hi + 1, (batch,), generator=gen, dtype=torch.int32)
    if long > 0:
        lens[torch.randperm(batch, generator=gen)[: math.ceil(long * batch)]] *= 5
    return lens


def time_case(batch: int, context: int, layers: int, splits: int, tiles: tuple[int, int, int], heads: tuple[int, int],
              head_dim: int, pools: list[tuple[torch.Tensor, torch.Tensor]], replays: int,
              lens_cpu: torch.Tensor | None = None, interleaved: bool = False, spare: float | None = None) -> float:
    """Microseconds per layer of one decode step's attention at ``batch`` x ``context`` tokens
    (``lens_cpu``: each request's length, at most ``context``). ``interleaved``: token t of
    every request in neighbouring slots, as slots taken one per request per decode step lie; else
    each request's slots contiguous, requests shuffled. ``spare``: the balanced cut
    (``balanced_splits``) over a grid of at least ``spare * batch`` pieces beyond one per request
    and ``splits`` per request; None: each request in up to ``splits`` pieces of 64 tokens or more."""
    dev, dt = pools[0][0].device, pools[0][0].dtype
    hq, hkv = heads
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    place = torch.randperm(batch, generator=gen)  # where each request's slots go among the others'
    t = torch.arange(context)[None, :]
    slots = 1 + (t * batch + place[:, None] if interleaved else t + place[:, None] * context)
    kv_indices = slots.reshape(-1).to(dev)
    starts = torch.arange(0, batch * context, context, dtype=torch.int32, device=dev)
    lens = (lens_cpu if lens_cpu is not None else torch.full((batch,), context, dtype=torch.int32)).to(dev)
    if spare is None:
        grid = batch * splits
        num_splits = plan_kv_splits(lens, splits, 64)
    else:
        grid = max(batch * splits, batch + math.ceil(spare * batch))
        num_splits = balanced_splits(lens, grid, 64)
    pieces = cut_pieces(num_splits, grid, depth=splits)
    qkv = torch.randn(batch, (hq + 2 * hkv) * head_dim, device=dev, dtype=dt)
    cos = torch.randn(context, head_dim, device=dev)
    sin = torch.randn(context, head_dim, device=dev)
    norm = torch.ones(head_dim, device=dev, dtype=dt)
    last = lens.long() - 1
    rope = NewTokenRope(last, cos, sin, norm, norm, 1e-6, kv_indices[starts.long() + last].clone())
    out = torch.empty(batch, hq, head_dim, device=dev, dtype=dt)
    mid_o, mid_lse = decode_workspace(grid, hq, head_dim, dev)

    def step() -> None:
        for i in range(layers):
            k, v = pools[i]
            decode_attention_qkv(qkv, hq, rope, k, v, kv_indices, starts, lens, head_dim**-0.5, pieces,
                                 out=out, mid_o=mid_o, mid_lse=mid_lse, tiles=tiles)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    return sorted(times)[len(times) // 2]


def _name(key: tuple) -> str:
    splits, spare, (n, w, st) = key
    cut = "" if spare is None else f" bal{spare:g}"
    return f"S{splits}{cut} {n}/{w}/{st}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=_ints, default=_ints("17,24,32,48,64,96,128,192,256"))
    p.add_argument("--context", type=_ints, default=_ints("300,1000,3000"))
    p.add_argument("--splits", type=_ints, default=_ints("1,2"), help="grid depths tried")
    p.add_argument("--tiles", type=_tiles, default=_tiles(TILES), help="block_n/warps/stages choices tried")
    p.add_argument("--ragged", type=float, default=0.0, help="lengths uniform in context * (1 +- this)")
    p.add_argument("--long", type=float, default=0.0, help="this fraction of requests 5x as long")
    p.add_argument("--interleaved", action="store_true", help="slots as decode steps take them (see time_case)")
    p.add_argument("--spare", type=_spares, default=_spares("u"),
                   help="cuts tried: 'u' uniform, a number the balanced cut's spare pieces per request")
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-layers", type=int, default=28)
    p.add_argument("--step-bytes", type=float, default=2e9, help="KV bytes a timed step reads, at most")
    p.add_argument("--replays", type=int, default=15)
    p.add_argument("--all", action="store_true", help="print every choice's time, not only the best four")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    copy_bps = copy_bandwidth(dev)
    print(describe_device(dev))
    print(f"measured copy bandwidth (read + write): {copy_bps / 1e12:.2f} TB/s")
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    token_bytes = 2 * hkv * d * 2
    best_by_batch: dict[int, dict] = {}
    for batch, context in itertools.product(args.batch, args.context):
        lens = request_lens(batch, context, args.ragged, args.long)
        span = int(lens.max())
        layer_bytes = int(lens.sum()) * token_bytes
        layers = max(1, min(args.max_layers, math.floor(args.step_bytes / layer_bytes)))
        slots = batch * span + 1
        pools = [(torch.empty(slots, hkv, d, device=dev, dtype=dt).normal_(),
                  torch.empty(slots, hkv, d, device=dev, dtype=dt).normal_()) for _ in range(layers)]
        results = {}
        for splits, spare, tiles in itertools.product(args.splits, args.spare, args.tiles):
            results[(splits, spare, tiles)] = time_case(batch, span, layers, splits, tiles, (hq, hkv), d, pools,
                                                        args.replays, lens, args.interleaved, spare)
        del pools
        ranked = sorted(results, key=results.get)
        cells = "  ".join(f"{_name(k)} {results[k]:6.1f}" for k in ranked[:4])
        base = results[(args.splits[0], args.spare[0], args.tiles[0])]
        pct = 100 * layer_bytes / (results[ranked[0]] * 1e-6) / copy_bps
        print(f"B {batch:4d} ctx {context:5d} L {layers:2d} | first {base:7.1f} us | best {cells} "
              f"({pct:.0f}% of copy)", flush=True)
        if args.all:
            print("    " + "  ".join(f"{_name(k)} {us:.1f}" for k, us in results.items()))
        for key, us in results.items():
            best_by_batch.setdefault(batch, {}).setdefault(key, 0.0)
            best_by_batch[batch][key] += us / base  # each context weighs the same
    print("per batch size, the choice with the least summed time relative to the first over the contexts:")
    for batch, sums in best_by_batch.items():
        key = min(sums, key=sums.get)
        n = len(args.context)
        print(f"B {batch:4d}: {_name(key)}  mean ratio {sums[key] / n:.3f}")


if __name__ == "__main__":
    main()
