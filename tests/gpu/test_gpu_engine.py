"""The engine on a GPU: Triton attention, CUDA graphs, bf16 against transformers."""

from __future__ import annotations

import random

import pytest
import torch

from rollout import Engine, SamplingParams

pytestmark = pytest.mark.gpu


def prompts(n: int, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    return [(shared if i % 2 else []) + [rng.randrange(3, vocab) for _ in range(rng.randrange(5, 90))]
            for i in range(n)]


@pytest.fixture(scope="module")
def qwen3_dir(tiny_model_dir):
    # Qwen3-shaped (qk-norm, GQA 2:1, head_dim 128) but small enough to test quickly.
    return tiny_model_dir("qwen3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=1024,
                          init_std=0.08)


@pytest.mark.parametrize("case", ["short", "across-splits"])
def test_cuda_graph_replay_equals_eager(qwen3_dir, case) -> None:
    """The graphs capture the Triton backend's prepare(): the long prompts cross the KV-split
    thresholds (every 128 tokens) while decoding, so a split count or run start frozen at capture
    would show."""
    if case == "short":
        ps, new_tokens = prompts(13), 24
    else:
        rng = random.Random(1)
        ps, new_tokens = [[rng.randrange(3, 300) for _ in range(rng.randrange(100, 400))] for _ in range(13)], 40
    sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    with Engine(qwen3_dir, device="cuda", attention_backend="triton", cuda_graph_max_bs=0,
                max_total_tokens=1 << 15) as eager:
        ref = eager.generate(ps, sp, return_logprob=True)
    with Engine(qwen3_dir, device="cuda", attention_backend="triton", max_total_tokens=1 << 15) as graphed:
        assert graphed.info().device == "cuda"
        outs = graphed.generate(ps, sp, return_logprob=True)
        graphed.check_integrity()
    for o, r in zip(outs, ref):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-3


def test_triton_backend_matches_torch_reference_fp32(qwen3_dir) -> None:
    ps = prompts(9, seed=1)
    sp = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    with Engine(qwen3_dir, device="cuda", attention_backend="torch", cuda_graph_max_bs=0,
                max_total_tokens=1 << 15) as ref_engine:
        ref = ref_engine.generate(ps, sp, return_logprob=True)
    with Engine(qwen3_dir, device="cuda", attention_backend="triton", page_size=16,
                max_total_tokens=1 << 15) as engine:
        outs = engine.generate(ps, sp, return_logprob=True)
    for o, r in zip(outs, ref):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-3


@pytest.fixture(scope="module")
def trained_dir(qwen3_dir, tmp_path_factory) -> str:
    """The Qwen3-shaped model trained briefly on a fixed next-token map (a random permutation).

    Random weights leave the top two logits close at many steps, where bf16 rounding of either
    implementation picks the token; a trained model is confident like a real checkpoint, so equal
    greedy output is a fair requirement for it.
    """
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).cuda().train()
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    perm = torch.randperm(vocab, generator=gen, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        seq = [torch.randint(0, vocab, (64,), generator=gen, device="cuda")]
        for _ in range(63):
            seq.append(perm[seq[-1]])
        ids = torch.stack(seq, 1)  # (64, 64)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss) < 0.05, f"training did not converge (loss {float(loss):.3f})"
    path = str(tmp_path_factory.mktemp("trained"))
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{qwen3_dir}/{f}", path)
    return path


def test_bf16_greedy_matches_transformers(trained_dir) -> None:
    """bf16 greedy output (Triton attention, CUDA graphs) equals transformers' bf16 greedy output."""
    from transformers import AutoModelForCausalLM

    n_new = 32
    hf = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.bfloat16).cuda().eval()
    ps = prompts(6, seed=2)
    with Engine(trained_dir, device="cuda", dtype="bfloat16", attention_backend="triton",
                max_total_tokens=1 << 15) as engine:
        outs = engine.generate(ps, SamplingParams(temperature=0.0, max_new_tokens=n_new, min_new_tokens=n_new))
    for p, o in zip(ps, outs):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=n_new,
                              min_new_tokens=n_new, attention_mask=torch.ones(1, len(p), dtype=torch.long,
                                                                               device="cuda"))
        assert o.output_ids == ref[0, len(p):].tolist()


def test_fused_kernels_and_overlap_match_the_plain_path(qwen3_dir, monkeypatch) -> None:
    """The fast path (fused element-wise kernels, overlap scheduling, graphs) gives the tokens of
    the plain one (torch element-wise ops, synchronous steps), with sampling and greedy rows."""
    from rollout.layers import fused_ops

    ps = prompts(11, seed=3)
    sps = [SamplingParams(temperature=0.0 if i % 2 else 0.8, top_p=0.9, seed=i, max_new_tokens=20 + i,
                          ignore_eos=True) for i in range(len(ps))]
    monkeypatch.setattr(fused_ops, "MODE", "0")
    with Engine(qwen3_dir, device="cuda", attention_backend="triton", overlap_schedule=False,
                max_total_tokens=1 << 15) as plain:
        ref = plain.generate(ps, sps, return_logprob=True)
    monkeypatch.setattr(fused_ops, "MODE", "1")
    with Engine(qwen3_dir, device="cuda", attention_backend="triton", max_total_tokens=1 << 15) as fast:
        outs = fast.generate(ps, sps, return_logprob=True)
        fast.check_integrity()
    for o, r in zip(outs, ref):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-3
