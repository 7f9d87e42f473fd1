"""The skinny matmul with the RMSNorm in front of it (``kernels.gemv`` ``norm=InputNorm(...)``)
against the two kernels it replaces: ``kernels.fused.rmsnorm`` (with the residual add), then the
plain skinny matmul; and a decoder whose norms go into its matmuls against the torch path.

Without CUDA the kernels run in Triton's interpreter; with CUDA the same tests compile them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
triton = pytest.importorskip("triton")

from kernels.fused import rmsnorm  # noqa: E402
from kernels.gemv import CONFIGS, FMA_CONFIGS, FMA_MAX_ROWS, InputNorm, gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 300), (3, 24, 512), (16, 9, 64)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_normed_gemv_is_rmsnorm_then_gemv(dtype, m, n, k, residual, gated):
    """Summed rows bit for bit; the product as the plain kernel's on the norm kernel's output, up to
    a last-bit difference of a normed element (the sum of squares runs tile by tile here)."""
    gen = torch.Generator().manual_seed(m * n + k + 2 * residual + gated)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    r = torch.randn(m, k, generator=gen).to(DEVICE, dtype) if residual else None
    nw = (torch.rand(k, generator=gen) + 0.5).to(DEVICE, dtype)
    w = (torch.randn(2 * n if gated else n, k, generator=gen) * 0.1).to(DEVICE, dtype)
    if residual:
        h, want_sum = rmsnorm(x, nw, 1e-6, r)
    else:
        h = rmsnorm(x, nw, 1e-6)
    ran = 0
    for config in (CONFIGS[0], FMA_CONFIGS[0]) if m <= FMA_MAX_ROWS else (CONFIGS[0],):
        summed = torch.full_like(x, float("nan")) if residual else None
        try:
            got = gemv(x, w, None, config, gated, InputNorm(nw, 1e-6, r, summed))
        except triton.runtime.errors.OutOfResources:  # fp32 tiles over a GPU's shared memory: never chosen
            continue
        ran += 1
        want = gemv(h, w, None, config, gated)
        assert got.shape == want.shape == (m, n) and got.dtype == dtype
        if residual:
            assert torch.equal(summed, want_sum), config
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.float() - want.float()).abs().max().item() <= tol * max(want.float().abs().max().item(), 1.0)
    assert ran


def test_normed_gemv_wants_matching_rows():
    x = torch.ones(2, 8, device=DEVICE)
    w = torch.ones(4, 8, device=DEVICE)
    with pytest.raises(AssertionError, match="K elements"):
        gemv(x, w, None, CONFIGS[0], norm=InputNorm(torch.ones(7, device=DEVICE), 1e-6))
    with pytest.raises(AssertionError, match="buffer for the summed rows"):
        gemv(x, w, None, CONFIGS[0], norm=InputNorm(torch.ones(8, device=DEVICE), 1e-6, torch.ones_like(x)))


def test_engine_with_norms_in_the_matmuls_gives_the_torch_path_tokens(tiny_model_dir, monkeypatch):
    """With the fused kernels on (the interpreter on CPU) and a skinny kernel chosen for every
    shape, decode steps take each layer's norms into its qkv and gate_up matmuls (the first layer's
    without a residual); tokens and logprobs are the torch path's."""
    from rollout import Engine, SamplingParams
    from rollout.layers import fused_ops, linear, skinny

    normed = []
    real_gemv = skinny.gemv

    def counting_gemv(x, weight, bias, config, gated=False, norm=None):
        if norm is not None:
            normed.append((gated, norm.residual is not None))
        return real_gemv(x, weight, bias, config, gated, norm)

    monkeypatch.setattr(skinny, "gemv", counting_gemv)
    # No timing without CUDA: one config per kind (fp32 tiles that fit a GPU's shared memory too).
    monkeypatch.setattr(skinny, "choose", lambda x, *a, **k: FMA_CONFIGS[1] if x.shape[0] <= FMA_MAX_ROWS
                        else CONFIGS[0])
    monkeypatch.setattr(linear, "_SKINNY_DTYPES", (torch.float32,))
    path = tiny_model_dir("qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 290, (5 + 4 * i,), generator=gen).tolist() for i in range(3)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    outs = {}
    for mode in ("all", "0"):
        monkeypatch.setattr(fused_ops, "MODE", mode)
        with Engine(path, device=DEVICE, dtype="float32", attention_backend="triton" if mode == "all" else "torch",
                    page_size=4) as engine:
            outs[mode] = engine.generate(prompts, sp, return_logprob=True)
            engine.check_integrity()
    assert {(False, False), (False, True), (True, True)} <= set(normed)  # qkv first layer, qkv, gate_up
    for o, r in zip(outs["all"], outs["0"]):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-4


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("norm", [0, 1, 2])
def test_each_form_is_timed_against_the_path_it_replaces(gated, norm, monkeypatch):
    """The baseline a skinny form is timed against computes what the form computes, and asks for the
    choices of other forms only: asking for its own would recurse into its own timing."""
    import torch.nn.functional as F

    from kernels.fused import reference
    from rollout.layers import skinny

    asked = []
    monkeypatch.setattr(skinny, "choose", lambda x, w, b, g=False, n=0: asked.append((g, n)))  # None: cuBLAS
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, generator=gen).to(DEVICE)
    r = torch.randn(2, 64, generator=gen).to(DEVICE)
    nw = (torch.rand(64, generator=gen) + 0.5).to(DEVICE)
    w = torch.randn(48, 64, generator=gen).to(DEVICE)
    input_norm = None if norm == 0 else InputNorm(nw, 1e-6, r if norm == 2 else None, torch.empty_like(x))
    got = skinny._plain(x, w, None, gated, input_norm)
    h = x if norm == 0 else reference.rmsnorm(x + r if norm == 2 else x, nw, 1e-6)
    want = F.linear(h, w)
    if gated:
        want = reference.silu_and_mul(want)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert (gated, norm) not in asked
