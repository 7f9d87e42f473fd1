"""The MoE router kernel and the tile tuner on a GPU: the router against torch at the Qwen3-30B-A3B
shape (bf16 logits, where ties occur), and a short tuner run whose file the fused MoE then reads."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

DEVICE = "cuda"


@pytest.mark.parametrize("tokens", [1, 100, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_router_kernel_matches_torch(tokens, dtype):
    """select_experts on CUDA (the kernel) against the torch reference, 128 experts, top-8. bf16 logits
    tie often: the ids may then differ among equal probabilities, so weights are compared, and the
    kernel's weights must be the probabilities of the ids it returns."""
    from rollout.layers.moe import select_experts, select_experts_reference

    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    logits = (torch.randn(tokens, 128, device=DEVICE, generator=gen) * 2).to(dtype)
    for renormalize in (False, True):
        weights, ids = select_experts(logits, 8, renormalize)
        ref_w, ref_ids = select_experts_reference(logits, 8, renormalize)
        assert torch.allclose(weights, ref_w, rtol=1e-5, atol=1e-7)
        if dtype == torch.float32:
            assert torch.equal(ids, ref_ids)
        probs = torch.softmax(logits.float(), dim=-1).gather(1, ids)
        if renormalize:
            probs = probs / probs.sum(-1, keepdim=True)
        assert torch.allclose(weights, probs, rtol=1e-5, atol=1e-7)
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts


@torch.no_grad()
def test_tuner_writes_a_file_the_fused_moe_reads(tmp_path, monkeypatch, capsys):
    from kernels.moe import fused_experts_triton
    from kernels.moe.fused_moe import select_config
    from kernels.moe.tune import main
    from kernels.moe.tuned_configs import CONFIG_DIR_ENV, config_file_name, device_name, load_table
    from rollout.layers.moe import fused_experts_reference, select_experts

    e, k, h, i = 8, 2, 128, 64
    main(["--experts", str(e), "--hidden", str(h), "--intermediate", str(i), "--top-k", str(k),
          "--token-counts", "1,40", "--out-dir", str(tmp_path)])
    assert "speed-up" in capsys.readouterr().out
    path = tmp_path / config_file_name(e, i, h, torch.bfloat16, device_name(torch.device(DEVICE, 0)))
    table = load_table(path)
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for tokens, cfg in zip((1, 40), table.configs):
        x = torch.randn(tokens, h, device=DEVICE, generator=gen).bfloat16()
        w13 = (torch.randn(e, 2 * i, h, device=DEVICE, generator=gen) * h**-0.5).bfloat16()
        w2 = (torch.randn(e, h, i, device=DEVICE, generator=gen) * i**-0.5).bfloat16()
        weights, ids = select_experts(torch.randn(tokens, e, device=DEVICE, generator=gen), k, renormalize=True)
        assert select_config(x, w13, tokens * k) == cfg
        out = fused_experts_triton(x, w13, w2, weights, ids)
        exact = fused_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
        assert (out.float() - exact).abs().max().item() <= 1e-2 * exact.abs().max().item()
