"""Expert parallelism on two gloo ranks (CPU): the same outputs as one rank, rebalancing, pushes."""

from __future__ import annotations

import pytest
import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.config import ModelConfig, ParallelConfig
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from rollout.layers.expert_placement import ExpertPlacement, balanced
from tests.hf_oracle import hf_greedy
from tests.weight_helpers import perturb_checkpoint

TOL = 1e-4
OPTS = dict(max_total_tokens=1024, chunked_prefill_size=4, max_running_requests=8)
PROMPTS = [[5, 9, 14, 3, 27, 31, 8], [5, 9, 14, 3, 60], [70, 71, 72], [100, 3, 45, 2]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
# Experts that do not divide over two ranks, top-k > 1.
CASES = {"qwen3_moe": ("qwen3_moe", 7, 3), "mixtral": ("mixtral", 5, 2)}


def _outs(engine: Engine) -> list:
    return engine.generate(PROMPTS, GREEDY, return_logprob=True)


def _same(want: list, got: list) -> None:
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids
        assert max(abs(a - b) for a, b in zip(w.output_logprobs, g.output_logprobs)) < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_two_expert_parallel_ranks_generate_what_one_rank_generates(tiny_model_dir, name: str) -> None:
    arch, experts, top_k = CASES[name]
    path = tiny_model_dir(arch, num_experts=experts, num_experts_per_tok=top_k)
    with Engine(path, **OPTS) as one:
        want = _outs(one)
        with pytest.raises(FailedPreconditionError, match="ep_size > 1"):
            one.rebalance_experts()
    with Engine(path, ep_size=2, ep_spare_slots=2, **OPTS) as two:
        _same(want, _outs(two))
        report = two.rebalance_experts()
        assert report["tokens"] > 0 and report["moved"] > 0
        assert report["balancedness_after"] >= report["balancedness_before"]
        _same(want, _outs(two))  # the placement changed, the function did not
        assert two.info().tp_size == 2


def test_routed_experts_with_two_ranks_equal_one_rank(tiny_model_dir) -> None:
    """Replay data does not depend on where the experts run (rank 0 records the router's choice)."""
    path = tiny_model_dir("qwen3_moe", num_experts=7, num_experts_per_tok=3)
    with Engine(path, enable_return_routed_experts=True, **OPTS) as one:
        want = one.generate(PROMPTS, GREEDY, return_routed_experts=True)
    with Engine(path, ep_size=2, ep_spare_slots=1, enable_return_routed_experts=True, **OPTS) as two:
        two.generate(PROMPTS, GREEDY)
        two.rebalance_experts()
        got = two.generate(PROMPTS, GREEDY, return_routed_experts=True)
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids
        assert (g.routed_experts == w.routed_experts).all()
        assert (g.prompt_routed_experts == w.prompt_routed_experts).all()


def test_periodic_rebalancing_keeps_the_outputs(tiny_model_dir) -> None:
    path = tiny_model_dir("mixtral", num_experts=5, num_experts_per_tok=2)
    with Engine(path, ep_size=2, ep_spare_slots=1, **OPTS) as plain:
        want = _outs(plain)
        counted = plain.rebalance_experts()["tokens"]
    with Engine(path, ep_size=2, ep_spare_slots=1, ep_rebalance_interval=3, **OPTS) as periodic:
        _same(want, _outs(periodic))
        # Rebalances during the run reset the counts: fewer tokens are left since the last one.
        assert periodic.rebalance_experts()["tokens"] < counted


def test_pushes_land_in_the_right_slots_before_and_after_a_rebalance(tiny_model_dir, tmp_path) -> None:
    path = tiny_model_dir("qwen3_moe", num_experts=7, num_experts_per_tok=3)
    weights, new_dir = perturb_checkpoint(path, str(tmp_path), seed=5)
    eos = ModelConfig.from_pretrained(path).eos_token_ids
    old = [hf_greedy(path, p, 6, eos)[0] for p in PROMPTS]
    new = [hf_greedy(new_dir, p, 6, eos)[0] for p in PROMPTS]
    assert old != new
    with Engine(path, ep_size=2, ep_spare_slots=1, **OPTS) as engine:
        assert [o.output_ids for o in _outs(engine)] == old
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=16 << 10, timeout_s=60) as group:
            assert group.comm.cfg.world_size == 3
            assert group.push(weights.items(), version=2) == 2
            assert [o.output_ids for o in _outs(engine)] == new
            engine.rebalance_experts()
            assert [o.output_ids for o in _outs(engine)] == new
            assert group.push(iter(torch.load(_save(path, tmp_path)).items()), version=3) == 3
        assert [o.output_ids for o in _outs(engine)] == old
        assert engine.update_weights_from_disk(new_dir) == 4
        assert [o.output_ids for o in _outs(engine)] == new


def _save(path: str, tmp_path) -> str:
    from rollout.models.loader import iter_checkpoint

    out = str(tmp_path / "original.pt")
    torch.save(dict(iter_checkpoint(path)), out)
    return out


def test_a_rebalance_while_the_weights_are_released_is_refused(tiny_model_dir) -> None:
    """Moving experts needs the weights mapped: refused up front (as an update is), and the weights
    resumed from their host backup stay valid (the ranks failed mid-move and marked them invalid)."""
    path = tiny_model_dir("qwen3_moe", num_experts=7, num_experts_per_tok=3)
    with Engine(path, ep_size=2, ep_spare_slots=2, memory_backup_tags=["weights"], **OPTS) as engine:
        want = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
        engine.release_memory(["weights"])
        with pytest.raises(FailedPreconditionError, match="before moving experts"):
            engine.rebalance_experts()
        engine.resume_memory(["weights"])
        assert engine.info().weights_valid
        assert [o.output_ids for o in engine.generate(PROMPTS, GREEDY)] == want


def test_placements() -> None:
    p = ExpertPlacement.contiguous(7, 2, spare_slots=1)
    assert p.slots == ((0, 1, 2, 3, -1), (4, 5, 6, -1, -1))
    counts = [100.0, 1, 1, 1, 1, 1, 1]  # one hot expert
    q = balanced(counts, 2, 5)
    assert sorted(e for r in q.slots for e in r if e >= 0).count(0) == 2  # the hot one has a copy per rank
    assert q.balancedness(counts) > p.balancedness(counts)
    assert q.balancedness(counts) > 0.95
    count, rank, slot = q.routing_tables("cpu")
    assert count.tolist()[0] == 2 and set(rank[0].tolist()) == {0, 1}
    with pytest.raises(InvalidArgumentError, match="no slot"):
        ExpertPlacement(3, ((0, 1), (1, -1)))
    with pytest.raises(InvalidArgumentError, match="ep_size"):
        ParallelConfig(ep_size=3, tp_size=2)


def test_expert_counts_skip_rows_that_write_the_padding_slot() -> None:
    """CUDA-graph padding rows (and verify fillers) write KV slot 0: their routing is not counted,
    so a rebalance sees only real tokens."""
    from rollout.batch import ForwardBatch
    from rollout.layers.moe import SparseMoeBlock

    torch.manual_seed(0)
    block = SparseMoeBlock(6, 2, 8, 16, True, dtype=torch.float32, device="cpu")
    block.register_buffer("expert_counts", torch.zeros(6, dtype=torch.int64), persistent=False)
    x = torch.randn(5, 8)
    empty = torch.zeros(0, dtype=torch.int64)
    batch = ForwardBatch(input_ids=empty, positions=empty, out_cache_loc=torch.tensor([7, 0, 9, 0, 0]),
                         qo_indptr=empty, kv_indptr=None, kv_indices=None, seq_lens=empty, logits_indices=empty,
                         seq_lens_cpu=[], extend_lens_cpu=[], prefix_lens_cpu=[], attn_backend=None)
    block(x, batch)
    assert block.expert_counts.sum().item() == 2 * 2  # two real rows, top-2
    block.expert_counts.zero_()
    block(x)  # no batch (no slots known): every row counts
    assert block.expert_counts.sum().item() == 5 * 2
