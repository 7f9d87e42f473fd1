"""RebalanceExperts over gRPC: a ``rollout serve --ep-size 2`` server (two gloo ranks on CPU) moves its
experts and generates what it generated before; a dense server refuses with a reason."""

from __future__ import annotations

import asyncio

import pytest

from rollout.client import AsyncRolloutClient
from rollout.errors import FailedPreconditionError
from rollout.types import SamplingParams
from tests.waiting import DeadlineClient

PROMPTS = [[5, 9, 14, 3, 27, 31, 8], [5, 9, 14, 3, 60], [70, 71, 72], [100, 3, 45, 2]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
TOL = 1e-4  # the all-reduce sums the experts' parts in another grouping once they moved
REPORT_KEYS = {"balancedness_before", "balancedness_after", "moved", "tokens"}  # Engine.rebalance_experts's


def _same(want: list, got: list) -> None:
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids
        assert max(abs(a - b) for a, b in zip(w.output_logprobs, g.output_logprobs)) < TOL


def test_rebalance_over_grpc_keeps_the_outputs(start_server, tiny_model_dir) -> None:
    # Seven experts on two ranks (uneven), top-k 3, two spare slots per rank for copies.
    path = tiny_model_dir("qwen3_moe", num_experts=7, num_experts_per_tok=3)
    server = start_server("--model", path, "--ep-size", "2", "--ep-spare-slots", "2",
                          "--max-total-tokens", "1024", "--chunked-prefill-size", "4")
    with DeadlineClient(server.address) as c:
        assert c.get_info().tp_size == 2
        want = c.generate_batch(PROMPTS, GREEDY, return_logprob=True)
        report = c.rebalance_experts()
        assert set(report) == REPORT_KEYS
        assert report["tokens"] > 0 and report["moved"] > 0
        assert 0.5 <= report["balancedness_before"] <= report["balancedness_after"] <= 1.0  # 1 / ep_size .. 1
        _same(want, c.generate_batch(PROMPTS, GREEDY, return_logprob=True))

        async def rebalance_async() -> dict:
            async with AsyncRolloutClient(server.address) as ac:
                return await asyncio.wait_for(ac.rebalance_experts(), 60)

        assert asyncio.run(rebalance_async())["tokens"] > 0  # the second batch's (prompts partly cached)
        # Nothing routed since: no load to balance, which reads as perfectly even, and no expert moves.
        quiet = c.rebalance_experts()
        assert quiet["tokens"] == 0 and quiet["balancedness_before"] == quiet["balancedness_after"] == 1.0
        assert quiet["moved"] == 0
        _same(want, c.generate_batch(PROMPTS, GREEDY, return_logprob=True))

def test_a_dense_server_refuses_to_rebalance(client) -> None:
    with pytest.raises(FailedPreconditionError, match="no MoE layers"):
        client.rebalance_experts()
    assert client.get_info().weights_valid  # refused before anything moved
