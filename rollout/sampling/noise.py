"""Per-row exponential noise for the exponential-race (Gumbel-max) sampler.

A row's noise depends only on its (seed, step) pair and the vocabulary size, never on the other
rows of the batch or on the row's position in it: each row gets its own generator, seeded with a
64-bit mix of the pair. Sampling with ``argmax(p / E)`` for ``E ~ Exp(1)`` i.i.d. then draws from
``p`` exactly, so the same request with the same seed produces the same tokens whatever it is
batched with.

Streams of CPU and CUDA generators differ, so a seed reproduces its tokens on the same device type.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, the splitmix64 increment


def mix_seed(seed: int, step: int) -> int:
    """Mix ``(seed, step)`` into one well-spread unsigned 64-bit generator seed (splitmix64).

    A plain ``seed + step`` would make (s, t + 1) and (s + 1, t) share their noise; multiplying the
    seed by the odd golden constant first keeps nearby pairs apart, and the finaliser scrambles the
    bits so that close inputs give unrelated generator states.
    """
    z = (seed * _GOLDEN + step + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def exponential_noise(
    seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """Draw ``Exp(1)`` noise of shape ``(B, vocab_size)`` float32, row ``i`` from ``(seeds[i], steps[i])``.

    Values are clamped away from zero so that ``p / E`` and ``log E`` stay finite. This is the
    reference implementation: one generator reseeded per row (a CUDA generator on CUDA devices).
    """
    assert seeds.shape == steps.shape and seeds.dim() == 1, "seeds and steps must be (B,) and alike"
    device = torch.device(device)
    seed_list = seeds.tolist()  # one host sync for the whole batch
    step_list = steps.tolist()
    out = torch.empty(len(seed_list), vocab_size, dtype=torch.float32, device=device)  # (B, V)
    gen = torch.Generator(device=device)
    for row, (seed, step) in enumerate(zip(seed_list, step_list, strict=True)):
        gen.manual_seed(mix_seed(int(seed), int(step)))
        out[row].exponential_(generator=gen)
    # An exact zero would make p / E infinite (or NaN for a zero-probability token).
    return out.clamp_(min=torch.finfo(torch.float32).tiny)  # (B, V)
