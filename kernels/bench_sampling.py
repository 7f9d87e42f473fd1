"""Benchmark of the fused sampling kernels against the sampler's torch path, one GPU.

    python -m kernels.bench_sampling                       # Qwen3 vocabulary, bf16 logits, batch 1..256
    python -m kernels.bench_sampling --chunks 8,16,32,64   # also the plain kernels at other chunk counts
    python -m kernels.bench_sampling --chunks 8,16,32,64 --only-chunks   # those alone

For each batch size: plain temperature sampling, top-p 0.9, top-k 50 + top-p 0.95, min-p 0.1, each
through ``Sampler.sample`` with the fused kernels on and off (logprobs on). The bandwidth column is
the logits' bytes over the fused time: the filtered kernels read each row about ten times (eight
radix levels, the boundary pass, the plain pass), so their share of the copy bandwidth says how far
they are from a single read. Logits are random normal (std 2), a shape between a trained model's and
a random one's.
"""

from __future__ import annotations

import argparse

import torch

from kernels.bench_utils import copy_bandwidth, describe_device, median_ms
from kernels.sampling.inverse_cdf import num_chunks, sample_rows
from rollout.layers import fused_ops
from rollout.sampling.sampler import Sampler
from rollout.sampling.sampling_batch import SamplingBatch
from rollout.types import SamplingParams

CASES = {
    "plain T=1": SamplingParams(),
    "top_p 0.9": SamplingParams(top_p=0.9),
    "top_k 50, top_p 0.95": SamplingParams(top_k=50, top_p=0.95),
    "min_p 0.1": SamplingParams(min_p=0.1),
}


def time_sampler(logits: torch.Tensor, batch: SamplingBatch, mode: str) -> float:
    fused_ops.MODE = mode
    sampler = Sampler()
    return median_ms(lambda: sampler.sample(logits, batch, return_logprob=True, return_raw_logprob=False,
                                            top_logprobs_num=0))


def print_chunk_sweep(logits: torch.Tensor, chunk_counts: list[int]) -> None:
    """The two plain-sampling kernels alone (``sample_rows``) at the default chunks per row and at
    ``chunk_counts``: more chunks spread the first kernel and shorten the second's scan. Timed as
    the device runs them, back to back in a CUDA graph (``rollout.layers.skinny``'s timing): one
    launch timed from the host measures the host's launch cost at small batches."""
    from rollout.layers.skinny import _per_call_ms

    b, vocab = logits.shape
    temps = torch.ones(b, device=logits.device)
    uniforms = torch.rand(b, dtype=torch.float64, device=logits.device)
    default = num_chunks(b, vocab, logits.device)
    counts = [default, *(c for c in chunk_counts if c != default)]
    for n in counts:  # every count once before any is timed: the first timed is not the coldest
        sample_rows(logits, temps, uniforms, chunks=n)
    for n in counts:
        us = _per_call_ms(lambda x, n=n: sample_rows(x, temps, uniforms, chunks=n), [logits]) * 1e3
        gbps = logits.numel() * logits.element_size() / (us * 1e-6) / 1e9
        label = f"kernels, {n} chunks" + (" (default)" if n == default else "")
        print(f"{b:>6} {label:<22} {'':>11} {us:>11.1f} {'':>9} {gbps:>12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunks", default="", help="chunks per row to time the plain kernels at, besides the default")
    ap.add_argument("--only-chunks", action="store_true", help="skip the sampler cases: the chunk sweep alone")
    args = ap.parse_args()
    device = torch.device("cuda")
    print(describe_device(device))
    copy_bps = copy_bandwidth(device)
    print(f"copy bandwidth {copy_bps / 1e12:.2f} TB/s (read + write)")
    print(f"{'batch':>6} {'case':<22} {'torch (us)':>11} {'fused (us)':>11} {'speed-up':>9} {'logits GB/s':>12}")
    saved = fused_ops.MODE
    try:
        for b in (int(x) for x in args.batches.split(",")):
            gen = torch.Generator(device=device).manual_seed(b)
            logits = (torch.randn(b, args.vocab, device=device, generator=gen) * 2).to(getattr(torch, args.dtype))
            for name, sp in ({} if args.only_chunks else CASES).items():
                batch = SamplingBatch.build([sp] * b, list(range(b)), [0] * b, None, device)
                slow, fast = time_sampler(logits, batch, "0"), time_sampler(logits, batch, "1")
                gbps = logits.numel() * logits.element_size() / (fast * 1e-3) / 1e9
                print(f"{b:>6} {name:<22} {slow * 1e3:>11.1f} {fast * 1e3:>11.1f} {slow / fast:>8.1f}x {gbps:>12.0f}")
            if args.chunks:
                print_chunk_sweep(logits, [int(x) for x in args.chunks.split(",")])
    finally:
        fused_ops.MODE = saved


if __name__ == "__main__":
    main()
