"""Decode attention launched with PDL, in a chain of layers replayed from a CUDA graph over several
decode steps, gives the bits of plain launches.

With PDL the split kernel loads the step's scalars and each piece's first KV tile while the qkv
matmul before it still runs, and reads the token being decoded only after its wait. The KV those
early loads see was stored by the previous step's replay, so a wait in the wrong place, or an
early load of something the step itself writes, shows as a mismatch in a later step."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HQ, HKV, D, HIDDEN, LAYERS, MAX_CTX = 16, 8, 128, 1024, 4, 1024


def _layers(x, weights, caches, step, pieces, configs):
    """``LAYERS`` of qkv matmul -> decode attention from qkv (storing the new k, v) -> o matmul.
    ``pieces``: the step's cut, made before (so no launch sits between the matmul and the
    attention kernel, whose early loads then overlap the matmul as in the engine)."""
    from kernels.attention import decode_attention_qkv
    from kernels.gemv import gemv

    for (w_qkv, w_o), (k_buf, v_buf) in zip(weights, caches):
        qkv = gemv(x, w_qkv, None, configs[0])
        attn = decode_attention_qkv(qkv, HQ, step["rope"], k_buf, v_buf, step["table"].view(-1),
                                    step["starts"], step["lens"], D ** -0.5, pieces)
        x = gemv(attn.view(x.shape[0], HQ * D), w_o, None, configs[1])
    return x


def _step_inputs(batch, lens, table, dev):
    """Positions, slots and KV lengths of a step where request b decodes its ``lens[b]``-th token."""
    from kernels.attention import NewTokenRope

    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, device=dev).float() / D)
    angles = torch.arange(MAX_CTX, device=dev).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    lens_t = torch.tensor(lens, device=dev)
    positions = lens_t - 1
    slots = table[torch.arange(batch, device=dev), positions]
    gen = torch.Generator(device=dev).manual_seed(7)
    q_w, k_w = ((torch.rand(D, device=dev, generator=gen) + 0.5).to(torch.bfloat16) for _ in range(2))
    rope = NewTokenRope(positions, angles.cos(), angles.sin(), q_w, k_w, 1e-6, slots)
    starts = torch.arange(batch, device=dev) * MAX_CTX
    return {"rope": rope, "table": table, "starts": starts, "lens": lens_t}


@pytest.mark.parametrize("batch,min_split", [(1, 64), (1, 128), (4, 64), (16, 128)])
@torch.no_grad()
def test_pdl_decode_chain_over_steps_matches_plain_launches(batch, min_split, monkeypatch) -> None:
    from kernels.attention import choose_max_splits, cut_pieces, plan_kv_splits
    from kernels.gemv import candidates
    from kernels.triton_utils import num_sms, pdl_enabled

    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev)[0] < 9:
        pytest.skip("PDL needs Hopper or later")
    gen = torch.Generator(device=dev).manual_seed(batch)
    bf = torch.bfloat16
    weights = [(torch.randn((HQ + 2 * HKV) * D, HIDDEN, device=dev, dtype=bf, generator=gen) * 0.03,
                torch.randn(HIDDEN, HQ * D, device=dev, dtype=bf, generator=gen) * 0.03) for _ in range(LAYERS)]
    num_slots = batch * MAX_CTX + 1
    table = (torch.randperm(num_slots - 1, device=dev, generator=gen) + 1)[: batch * MAX_CTX].view(batch, MAX_CTX)
    caches0 = [tuple(torch.randn(num_slots, HKV, D, device=dev, dtype=bf, generator=gen) for _ in range(2))
               for _ in range(LAYERS)]
    x0 = torch.randn(batch, HIDDEN, device=dev, dtype=bf, generator=gen)
    start_lens = [100 + 37 * b for b in range(batch)]
    max_splits = choose_max_splits(batch, HKV, num_sms(dev), 16)
    configs = (candidates(batch)[0], candidates(batch)[1])
    steps = 6

    def run(pdl: str, graphed: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("ROLLOUT_PDL", pdl)
        caches = [tuple(c.clone() for c in pair) for pair in caches0]
        step = _step_inputs(batch, start_lens, table, dev)  # fixed buffers, refilled each step
        num_splits = plan_kv_splits(step["lens"], max_splits, min_split)
        pieces = cut_pieces(num_splits, batch * max_splits, depth=max_splits)
        x_in = x0.clone()
        outs = []
        if graphed:
            # compile outside the capture
            _layers(x_in, weights, [tuple(c.clone() for c in p) for p in caches], step, pieces, configs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                got = _layers(x_in, weights, caches, step, pieces, configs)
            torch.cuda.current_stream().wait_stream(stream)
        for t in range(steps):
            fresh = _step_inputs(batch, [n + t for n in start_lens], table, dev)
            for name in ("lens", "starts"):
                step[name].copy_(fresh[name])
            step["rope"].positions.copy_(fresh["rope"].positions)
            step["rope"].slots.copy_(fresh["rope"].slots)
            plan_kv_splits(step["lens"], max_splits, min_split, out=num_splits)
            cut_pieces(num_splits, batch * max_splits, out=pieces)
            x_in.copy_(x0 + t)
            if graphed:
                graph.replay()
                outs.append(got.clone())
            else:
                outs.append(_layers(x_in, weights, caches, step, pieces, configs))
        torch.cuda.synchronize()
        return outs

    want = run("0", graphed=False)
    monkeypatch.setenv("ROLLOUT_PDL", "decode")
    assert pdl_enabled(x0, "decode"), "this GPU and Triton should take PDL launches"
    got = run("decode", graphed=True)
    for t, (w, g) in enumerate(zip(want, got)):
        assert torch.equal(w, g), f"step {t}: PDL graph differs from plain launches"
    eager = run("decode", graphed=False)
    for t, (w, g) in enumerate(zip(want, eager)):
        assert torch.equal(w, g), f"step {t}: eager PDL launches differ from plain launches"


def test_pdl_modes_reach_the_device(monkeypatch) -> None:
    """On a GPU that takes PDL, a kind launches with it exactly where ROLLOUT_PDL names it
    (the modes themselves: tests/unit/test_pdl_modes.py)."""
    from kernels.triton_utils import pdl_enabled, pdl_kinds

    x = torch.zeros(1, device="cuda")
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        pytest.skip("PDL needs Hopper or later")
    for mode in ("0", "linear", "decode", "all"):
        monkeypatch.setenv("ROLLOUT_PDL", mode)
        for kind in ("linear", "decode", "attention"):
            assert pdl_enabled(x, kind) == (kind in pdl_kinds()), (mode, kind)
