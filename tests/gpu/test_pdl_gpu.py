"""Kernels launched with programmatic dependent launch (PDL) give the bits they give without it.

A PDL kernel starts while the one before it still runs and waits for it before reading its
output; a wait in the wrong place shows as wrong or varying results in a chain of dependent
kernels replayed from a CUDA graph, which is how decode steps run them."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _chain(x, res, norm_w, w_up, w_down, configs):
    from kernels.fused.activation import silu_and_mul
    from kernels.fused.norm import rmsnorm
    from kernels.gemv import gemv

    for up_cfg, down_cfg in configs:
        h, res = rmsnorm(x, norm_w, 1e-6, residual=res)
        x = gemv(silu_and_mul(gemv(h, w_up, None, up_cfg)), w_down, None, down_cfg)
    return x, res


@pytest.mark.parametrize("rows", [1, 3, 16])
@torch.no_grad()
def test_pdl_chain_in_a_graph_matches_plain_launches(rows, monkeypatch) -> None:
    from kernels.gemv import candidates
    from kernels.triton_utils import pdl_enabled

    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev)[0] < 9:
        pytest.skip("PDL needs Hopper or later")
    gen = torch.Generator(device=dev).manual_seed(rows)
    hidden, inter = 1024, 3072
    x0 = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    r0 = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    norm_w = torch.rand(hidden, device=dev, dtype=torch.bfloat16, generator=gen) + 0.5
    w_up = torch.randn(2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=gen) * 0.03
    w_down = torch.randn(hidden, inter, device=dev, dtype=torch.bfloat16, generator=gen) * 0.03
    cands = candidates(rows)
    configs = [(cands[i % len(cands)], cands[(i + 3) % len(cands)]) for i in range(12)]

    monkeypatch.setenv("ROLLOUT_PDL", "0")
    assert not pdl_enabled(x0)
    want_x, want_r = _chain(x0.clone(), r0.clone(), norm_w, w_up, w_down, configs)

    monkeypatch.setenv("ROLLOUT_PDL", "all")
    assert pdl_enabled(x0), "this GPU and Triton should take PDL launches"
    x_in, r_in = x0.clone(), r0.clone()
    _chain(x_in, r_in, norm_w, w_up, w_down, configs)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        got_x, got_r = _chain(x_in, r_in, norm_w, w_up, w_down, configs)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got_x, want_x) and torch.equal(got_r, want_r)
    eager_x, eager_r = _chain(x0.clone(), r0.clone(), norm_w, w_up, w_down, configs)  # PDL launches, no graph
    assert torch.equal(eager_x, want_x) and torch.equal(eager_r, want_r)
