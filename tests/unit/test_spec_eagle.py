"""Speculative decoding with an EAGLE head (speculative_method="eagle"): a head trained briefly on
the target's own greedy text drafts far better than an untrained one while outputs, logprobs and
the sampled distribution stay the target's; the head's forward matches a plain torch reference;
the target keeps its features in every kind of step; ``draft.`` pushes reach the head."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import weight_sync
from rollout import Engine, SamplingParams
from rollout.batch import BatchPlan
from rollout.cache import kv_pool
from rollout.cache.kv_pool import KVPool
from rollout.cache.manager import KVCacheManager
from rollout.config import EngineConfig
from rollout.errors import InvalidArgumentError
from rollout.models.loader import iter_checkpoint
from rollout.runner.model_runner import ModelRunner
from rollout.runner.verify_graph import VerifyGraphRunner
from rollout.spec.drafting import draft_engine_config
from rollout.spec.eagle_head import TargetParts, head_config, load_eagle_head
from rollout.testing.cpu_graphs import install_cpu_graphs
from rollout.testing.eagle_head import train_eagle_head, write_eagle_head, write_eagle_target
from tests.unit.test_spec_draft import _samples
from tests.unit.test_spec_engine import SAMPLED, _prefixes, _two_sample_pvalue

PROMPTS = [[5, 17, 42, 99, 100, 7, 5, 17, 42], [1, 2, 3, 1, 2, 3], [9, 8, 7, 6, 5, 9, 8]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True, n=2)


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict[str, str]:
    """A target whose next token a small head can learn, a head trained on its greedy text, an untrained one."""
    target = write_eagle_target(str(tmp_path_factory.mktemp("eagle-target")))
    return dict(target=target,
                trained=train_eagle_head(target, str(tmp_path_factory.mktemp("eagle-trained"))),
                untrained=write_eagle_head(str(tmp_path_factory.mktemp("eagle-untrained")), target))


def _eagle(head: str, **options) -> dict:
    return {"speculative_method": "eagle", "draft_model_path": head, "num_draft_tokens": 3, **options}


def _mean_accepted(engine: Engine) -> float:
    """Drafts accepted per sequence-step that verified drafts."""
    info = engine.info()
    return info.spec_accepted / max(info.spec_verified, 1)


def test_trained_head_follows_greedy_decoding_and_is_accepted_more(heads) -> None:
    kw = dict(return_logprob=True, return_raw_logprob=True)
    with Engine(heads["target"]) as engine:
        plain = engine.generate(PROMPTS, GREEDY, **kw)
    accepted = {}
    for name in ("untrained", "trained"):
        # min_acceptance 0: both heads draft k = 3 every step, so their acceptance compares directly.
        with Engine(heads["target"], **_eagle(heads[name], speculative_min_acceptance=0.0)) as engine:
            out = engine.generate(PROMPTS, GREEDY, **kw)
            engine.check_integrity()
            assert engine.info().kv_used_tokens == 0
            accepted[name] = _mean_accepted(engine)
        for a, b in zip(plain, out):
            assert a.output_ids == b.output_ids
            assert a.output_logprobs == pytest.approx(b.output_logprobs, abs=1e-4)
            assert a.output_raw_logprobs == pytest.approx(b.output_raw_logprobs, abs=1e-4)
    assert accepted["untrained"] < 0.3 and accepted["trained"] > 1.5, accepted


def test_sampled_distribution_equals_plain(heads, engine_cores) -> None:
    plain = _samples(heads["target"], SAMPLED["t1"])
    spec = _samples(heads["target"], SAMPLED["t1"], **_eagle(heads["trained"], speculative_max_batch_size=1024))
    policy = engine_cores[-1].spec.policy
    assert 0.2 * policy.drafted < policy.accepted < 0.95 * policy.drafted  # the rule both accepts and rejects
    for n in (2, 4, 6):
        assert _two_sample_pvalue(_prefixes(plain, n), _prefixes(spec, n)) > 1e-3


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _reference(w: dict[str, torch.Tensor], cfg, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """fc, then Llama layers (layer 0 without input norm unless the file has one) over the whole
    sequence with causal attention, rotary at indices 0..T-1, no final norm: (T, H) -> (T, H)."""
    t, hd = embeds.shape[0], cfg.head_dim
    h = torch.cat([embeds, features], -1) @ w["fc.weight"].T + w.get("fc.bias", 0)
    inv = 1.0 / cfg.rope.theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]  # (T, 1, D)

    def rope(x: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1) * sin

    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        a = _rms(h, w[p + "input_layernorm.weight"], cfg.rms_norm_eps) if p + "input_layernorm.weight" in w else h
        q, k, v = (a @ w[f"{p}self_attn.{n}_proj.weight"].T + w.get(f"{p}self_attn.{n}_proj.bias", 0) for n in "qkv")
        q, k, v = rope(q.view(t, -1, hd)), rope(k.view(t, -1, hd)), v.view(t, -1, hd)  # (T, heads, D)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, -1)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        m = _rms(h, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return h


@pytest.mark.parametrize("layout", [dict(), dict(num_hidden_layers=2, fc_bias=False, input_norm=True, own_vocab=True,
                                                qkv_bias=True)], ids=["eagle1", "all-optional-parts-2-layers"])
@torch.inference_mode()
def test_head_forward_matches_a_plain_torch_reference(heads, tmp_path, layout) -> None:
    path = write_eagle_head(str(tmp_path), heads["target"], seed=3, **layout)
    cfg, w = head_config(path), load_file(os.path.join(path, "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    target_embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    head = load_eagle_head(path, cfg, TargetParts(target_embed, torch.nn.Identity()), torch.float32,
                           torch.device("cpu"), 128)
    engine_config = EngineConfig.build(heads["target"], speculative_method="eagle", draft_model_path=path)
    runner = ModelRunner(draft_engine_config(engine_config, 64, cfg), model=head)
    cache = KVCacheManager(num_slots=runner.num_slots, page_size=1, max_requests=2, max_context=64,
                           device="cpu", enable_prefix_cache=False)
    runner.bind_req_table(cache.req_table)
    seq = cache.new_seq()
    t = 12
    assert cache.ensure_capacity(seq, t)
    ids = torch.randint(0, cfg.vocab_size, (t,), generator=gen)
    features = torch.randn(t, cfg.hidden_size, generator=gen)

    def run(lo: int, hi: int) -> torch.Tensor:  # indices [lo, hi), attending to the head's KV of [0, lo)
        plan = BatchPlan(rows=[seq.row], prefix_lens=[lo], extend_lens=[hi - lo], input_ids=ids[lo:hi].tolist(),
                         out_slots=cache.slot_list(seq, lo, hi), sample=[True], sampling=[SamplingParams()],
                         seeds=[0], steps=[0], banned=[None], return_logprob=False, return_raw_logprob=False,
                         top_logprobs_num=0)
        batch = runner._build_batch(plan)
        runner.attn_backend.prepare(batch)
        return head(batch, features[lo:hi])

    out = torch.cat([run(0, 5), run(5, 11), run(11, 12)])  # an extend, a catch-up, one draft step
    embed = w["embed_tokens.weight"] if "embed_tokens.weight" in w else target_embed.weight
    ref = _reference(w, cfg, embed[ids], features)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if "lm_head.weight" in w:
        torch.testing.assert_close(head.compute_logits(out), ref @ w["lm_head.weight"].T, atol=1e-4, rtol=1e-4)
    runner.close()


@torch.inference_mode()
def test_head_loads_from_pytorch_model_bin(heads, tmp_path) -> None:
    """The published heads ship as pytorch_model.bin (read with weights_only); some conversions put
    ``model.`` before the names."""
    path = heads["untrained"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    weights = load_file(os.path.join(path, "model.safetensors"))
    torch.save({f"model.{n}" if n.startswith("layers.") else n: t for n, t in weights.items()},
               bin_dir / "pytorch_model.bin")
    parts = TargetParts(torch.nn.Embedding(8, 8), torch.nn.Identity())
    cfg = head_config(path)
    a, b = (load_eagle_head(p, cfg, parts, torch.float32, torch.device("cpu"), 64) for p in (path, str(bin_dir)))
    assert a.layout == b.layout and not a.layout.input_norm and a.layout.fc_bias
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_target_keeps_features_of_eager_graph_and_verify_steps(heads, engine_cores) -> None:
    """Prompts run eagerly, plain decode steps through the (CPU) decode-graph path, verify steps
    through the verify-graph buffers: the features the head reads are the target's final-normed
    hidden states at every position, as transformers computes them. They live in the kv_cache
    region, and after a release and resume of it they are computed again."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(heads["target"], dtype=torch.float32).requires_grad_(False)

    def check_features(core, outs, prompts=PROMPTS) -> None:
        for prompt, out in zip([p for p in prompts for _ in range(2)], outs):
            tokens = prompt + out.output_ids
            cached = core.cache.tree.match_prefix(tokens, 0, len(tokens))  # finished: in the prefix cache
            assert cached.length == len(tokens) - 1  # all but the last token were computed
            with torch.no_grad():
                want = hf.model(input_ids=torch.tensor([tokens])).last_hidden_state[0, : cached.length]
            got = core.runner.feature_store[cached.slots[: cached.length]]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # min_acceptance 1: after the first rejection only one step in 8 speculates, the others decode plainly.
    options = _eagle(heads["trained"], num_draft_tokens=2, speculative_min_acceptance=1.0)
    with Engine(heads["target"], **options) as engine:
        core = engine_cores[-1]
        runner = core.runner
        install_cpu_graphs(runner)
        graphs = VerifyGraphRunner(runner.model, runner.kv_pool, core.cache.req_table, [1, 2], 8, runner.device,
                                   core.config.context_length, feature_store=runner.feature_store)
        runner.verify_graphs = graphs
        outs = engine.generate(PROMPTS, GREEDY)
        assert graphs.replays > 0 and engine.info().spec_accepted > 0
        check_features(core, outs)
        memory = engine.info().memory["kv_cache"]
        assert memory["bytes"] >= runner.kv_pool.nbytes + runner.feature_store.nbytes
        engine.pause()
        engine.release_memory(["kv_cache"])
        assert engine.info().memory["kv_cache"]["state"] == "released"
        engine.resume_memory(["kv_cache"])
        engine.continue_()
        again = engine.generate(PROMPTS[:1], GREEDY)
        assert [o.output_ids for o in again] == [o.output_ids for o in outs[:2]]
        check_features(core, again, PROMPTS[:1])


def test_features_count_in_the_kv_pool_size(heads, monkeypatch) -> None:
    """A slot's feature row (hidden x dtype bytes) is paid from the KV budget like its K and V."""
    monkeypatch.setattr(kv_pool, "CPU_DEFAULT_KV_BYTES", 1 << 20)
    plain = EngineConfig.build(heads["target"])
    eagle = EngineConfig.build(heads["target"], **_eagle(heads["untrained"]))
    m = plain.model
    kv = KVPool.bytes_per_slot(m.num_hidden_layers, m.num_key_value_heads, m.head_dim, torch.float32)
    feature = m.hidden_size * 4
    cpu = torch.device("cpu")
    assert kv_pool.kv_pool_slots(plain, torch.float32, cpu, m.num_key_value_heads) == (1 << 20) // kv + 1
    assert kv_pool.kv_pool_slots(eagle, torch.float32, cpu, m.num_key_value_heads) == (1 << 20) // (kv + feature) + 1


def test_draft_pushes_reach_the_head_and_target_pushes_leave_it_stale(heads) -> None:
    trained = [(f"draft.{n}", t) for n, t in iter_checkpoint(heads["trained"])]
    with Engine(heads["target"], **_eagle(heads["untrained"], speculative_min_acceptance=0.0)) as engine:
        def run() -> tuple[list[list[int]], float]:
            before = engine.info()
            outs = engine.generate(PROMPTS, GREEDY)
            info = engine.info()
            return [o.output_ids for o in outs], (info.spec_accepted - before.spec_accepted) / max(
                info.spec_verified - before.spec_verified, 1)

        want, accepted = run()
        assert accepted < 0.3
        with pytest.raises(InvalidArgumentError, match=r"^draft\.fc\.weight: .*shape mismatch"):
            weight_sync.push_tensors_shm([engine], {**dict(trained), "draft.fc.weight": torch.ones(3)}.items(),
                                         version=2)
        assert weight_sync.push_tensors_shm([engine], trained, version=3) == 3
        out, accepted = run()
        assert out == want and accepted > 1.5  # the head drafts with the pushed weights
        target = list(iter_checkpoint(heads["target"]))
        assert weight_sync.push_tensors_shm([engine], target, version=4) == 4
        drafted = engine.info().spec_drafted
        out, _ = run()
        assert out == want and engine.info().spec_drafted == drafted  # stale head: no drafting
        engine.check_integrity()


def test_the_heads_memory_goes_and_comes_back_with_the_engines(heads, engine_cores) -> None:
    """A release frees the EAGLE head's weights and KV too; backed up, the head drafts as well after
    the resume as before it."""
    with Engine(heads["target"], memory_backup_tags=["weights"],
                **_eagle(heads["trained"], speculative_min_acceptance=0.0)) as engine:
        saver = engine_cores[-1].spec.draft.runner.memory.saver
        want = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
        engine.release_memory()
        assert all(s["state"] == "released" for s in saver.states().values())
        engine.resume_memory()
        before = engine.info()
        assert [o.output_ids for o in engine.generate(PROMPTS, GREEDY)] == want
        info = engine.info()
        assert (info.spec_accepted - before.spec_accepted) / max(info.spec_verified - before.spec_verified, 1) > 1.5
        engine.check_integrity()


def test_bad_heads_are_refused(heads, tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="draft_model_path"):
        Engine(heads["target"], speculative_method="eagle")
    cfg = json.load(open(os.path.join(heads["untrained"], "config.json")))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**cfg, "hidden_size": 32, "head_dim": 8}, f)
    with pytest.raises(InvalidArgumentError, match=r"^draft_model_path: .*hidden size \(32\) differs .* \(64\)"):
        Engine(heads["target"], speculative_method="eagle", draft_model_path=str(tmp_path))


@pytest.mark.parametrize("method", ["eagle", "draft"])
def test_one_token_draft_forwards_through_graph_buffers_equal_eager(heads, engine_cores, method) -> None:
    """The drafter's one-token forwards replay its decode graphs on a GPU; here (CPU) the same
    static-buffer path runs without capture and must draft what the eager forwards draft."""
    if method == "eagle":
        opts = _eagle(heads["trained"], speculative_min_acceptance=0.0)
    else:  # the target drafting for itself: a draft model with the target's tokenizer
        opts = dict(speculative_method="draft", draft_model_path=heads["target"], num_draft_tokens=3,
                    speculative_min_acceptance=0.0)
    runs = {}
    for graphs in (False, True):
        with Engine(heads["target"], **opts) as engine:
            replays = []
            if graphs:
                buffers = install_cpu_graphs(engine_cores[-1].spec.draft.runner)
                replay = buffers.replay
                buffers.replay = lambda gbs, seen=replays, run=replay: seen.append(gbs) or run(gbs)
            out = engine.generate(PROMPTS, GREEDY, return_logprob=True)
            engine.check_integrity()
            info = engine.info()
        runs[graphs] = ([o.output_ids for o in out], info.spec_drafted, info.spec_accepted)
        if graphs:
            assert replays, "no draft forward went through the graph buffers"
    assert runs[True] == runs[False]
    assert runs[True][2] > 0
