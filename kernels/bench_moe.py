"""Benchmark of the Triton fused MoE on one GPU, Qwen3-30B-A3B expert shape by default (128 experts,
top-8, hidden 2048, expert width 768, bf16), for a decode batch and a prefill batch.

    python -m kernels.bench_moe                  # 256 tokens (decode) and 4096 tokens (prefill)
    python -m kernels.bench_moe --sweep          # also try other tile shapes (same tiles for both GEMMs)

Tiles come from ``kernels/moe/configs`` where this GPU has a tuned file (``python -m kernels.moe.tune``),
else from ``default_config``; the header line says which.

FLOPs: 6 * hidden * width per (token, expert) pair (gate+up: 4 H I, down: 2 H I). Bytes: the weights
of every expert that received a token, read once, plus the activations written and read between
the kernels (x, act, per-pair outputs, the result). Decode is weight-bound, prefill MMA-bound.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from kernels.bench_utils import bandwidth_line, copy_bandwidth, describe_device, flops_line, median_ms
from kernels.moe import MoeKernelConfig, align_tokens_to_experts, default_config, fused_experts_triton
from kernels.moe.align_triton import align_tokens_to_experts_triton
from kernels.moe.fused_moe import select_config
from rollout.layers.moe import fused_experts_reference, select_experts, select_experts_reference


def bench_tokens(args: argparse.Namespace, tokens: int, device: torch.device, copy_bps: float) -> None:
    e, k, h, i = args.experts, args.top_k, args.hidden, args.inter
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, h, device=device, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=device, generator=gen) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=device, generator=gen) * i**-0.5).to(dtype)
    logits = torch.randn(tokens, e, device=device, generator=gen).to(dtype)
    weights, ids = select_experts(logits, k, renormalize=True)
    elt = x.element_size()
    touched = int(torch.unique(ids).numel())
    pairs = tokens * k
    weight_bytes = touched * 3 * h * i * elt
    act_bytes = (tokens * h + 2 * pairs * i + 2 * pairs * h + tokens * h) * elt
    flops = 6 * pairs * h * i

    out = fused_experts_triton(x, w13, w2, weights, ids)
    exact = fused_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    err = (out.float() - exact).abs().max().item() / exact.abs().max().item()
    cfg = select_config(x, w13, pairs)
    source = "default" if cfg == default_config(pairs, e) else "tuned"
    print(f"MoE {tokens} tokens, {e} experts ({touched} used) top-{k}, H={h} I={i} {args.dtype}, "
          f"rel err vs fp32 {err:.1e}, {source} tiles {cfg}")
    ms = median_ms(lambda: fused_experts_triton(x, w13, w2, weights, ids))
    print(bandwidth_line("  triton fused MoE       ", ms, weight_bytes + act_bytes, copy_bps))
    print(flops_line("  triton fused MoE       ", ms, flops))
    if source == "tuned":
        default_ms = median_ms(lambda: fused_experts_triton(x, w13, w2, weights, ids,
                                                            config=default_config(pairs, e)))
        print(f"  default tiles: {default_ms * 1e3:9.1f} us ({default_ms / ms:.2f}x the tuned time)")
    route_ms = median_ms(lambda: select_experts(logits, k, renormalize=True))
    ref_route_ms = median_ms(lambda: select_experts_reference(logits, k, renormalize=True))
    print(f"  router top-k (triton): {route_ms * 1e3:9.1f} us; torch softmax + topk {ref_route_ms * 1e3:.1f} us")
    align_ms = median_ms(lambda: align_tokens_to_experts_triton(ids, e, cfg.block_m))
    torch_ms = median_ms(lambda: align_tokens_to_experts(ids, e, cfg.block_m))
    print(f"  of which alignment (triton): {align_ms * 1e3:9.1f} us; torch-op reference {torch_ms * 1e3:.1f} us")
    ref_ms = median_ms(lambda: fused_experts_reference(x, w13, w2, weights, ids))
    print(f"  torch reference loop over experts: {ref_ms * 1e3:9.1f} us ({ref_ms / ms:.1f}x the kernel time)")
    if args.sweep:
        results = []
        block_ms = (16, 32) if cfg.block_m <= 32 else (64, 128)
        tiles = ((64, 64), (64, 128), (128, 64))
        for bm, (bn, bk), warps, stages in itertools.product(block_ms, tiles, (4, 8), (3, 4)):
            c = MoeKernelConfig.uniform(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            try:
                results.append((median_ms(lambda c=c: fused_experts_triton(x, w13, w2, weights, ids, config=c)), c))
            except Exception as exc:  # a tile set that does not fit shared memory: report, keep going
                print(f"  skipped {c}: {type(exc).__name__}")
        for t, c in sorted(results, key=lambda r: r[0])[:5]:
            print(flops_line(f"  sweep {c}", t, flops))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768, help="expert (moe_intermediate) width")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    copy_bps = copy_bandwidth(device)
    print(describe_device(device))
    print(f"measured copy bandwidth (1 GiB device-to-device, read + write): {copy_bps / 1e12:.2f} TB/s")
    for tokens in args.tokens:
        bench_tokens(args, tokens, device, copy_bps)


if __name__ == "__main__":
    main()
