"""Host-side work between steps must queue its device copies, never wait for the device.

A blocking copy from pageable memory waits for everything queued before it, so a scheduler write
between steps would make the host sit out the device's current step and undo overlap scheduling.
Each test queues a long device sleep, does the operation, and checks the sleep is still running.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

SLEEP_CYCLES = 2_000_000_000  # ~1 s on a ~2 GHz GPU: far longer than any host call here


def queued_behind_sleep(op) -> bool:
    """Run ``op`` while the current stream sleeps; True when ``op`` returned before the sleep ended.

    ``op`` runs once before, synchronised: the first launch of a kernel loads its module, which
    waits for the device (a one-off, not the per-step wait looked for here)."""
    op()
    torch.cuda.synchronize()
    done = torch.cuda.Event()
    torch.cuda._sleep(SLEEP_CYCLES)
    done.record()
    op()
    still_running = not done.query()
    torch.cuda.synchronize()
    return still_running


def test_request_table_write_does_not_wait_for_the_device() -> None:
    from rollout.cache.req_table import ReqToTokenTable

    table = ReqToTokenTable(4, 64, "cuda")
    row = table.alloc_row()
    slots = torch.arange(100, 140, dtype=torch.int64)
    assert queued_behind_sleep(lambda: table.write(row, 8, slots))
    assert table.table[row, 8:48].cpu().tolist() == slots.tolist()


def test_banned_ids_mask_does_not_wait_for_the_device() -> None:
    from rollout.sampling.sampler import _apply_banned

    logits = torch.zeros(3, 50, device="cuda")
    out = {}
    assert queued_behind_sleep(lambda: out.setdefault("m", _apply_banned(logits, [[1, 2], [], [49, 70]])))
    masked = out["m"].cpu()
    assert torch.isinf(masked[0, 1]) and torch.isinf(masked[0, 2]) and torch.isinf(masked[2, 49])
    assert torch.isfinite(masked[1]).all() and int(torch.isinf(masked).sum()) == 3


def test_host_inputs_do_not_wait_for_the_device() -> None:
    from rollout.runner.model_runner import host_segments_to_device

    out = {}
    assert queued_behind_sleep(lambda: out.setdefault("v", host_segments_to_device(
        [[1, 2, 3], list(range(1000))], torch.device("cuda"))))
    assert out["v"][1].cpu().tolist() == list(range(1000))


def test_decode_graph_inputs_and_draws_do_not_wait_for_the_device() -> None:
    """A graph-replayed decode step's inputs and sampling draws go to the graphs' packed buffer in one
    queued copy; an eager step's draws in a copy of their own, queued as well."""
    from rollout.attention.registry import create_attention_backend
    from rollout.batch import BatchPlan
    from rollout.cache.kv_pool import KVPool
    from rollout.runner.cuda_graph import DecodeGraphRunner
    from rollout.runner.step_inputs import copy_decode_inputs, draws_to_device
    from rollout.types import SamplingParams

    device = torch.device("cuda")
    backend = create_attention_backend("triton", KVPool(1, 64, 1, 16, torch.float16, device))
    table = torch.zeros(5, 64, dtype=torch.int64, device=device)
    graphs = DecodeGraphRunner(None, backend, 8, 0, device, req_table=table, padding_row=4)
    plan = BatchPlan(rows=[1, 2, 3], prefix_lens=[5, 6, 7], extend_lens=[1] * 3, input_ids=[-1, -2, -3],
                     out_slots=[9, 10, 11], sample=[True] * 3, sampling=[SamplingParams()] * 3, seeds=[0, 1, 2],
                     steps=[0] * 3, banned=[None] * 3, return_logprob=False, return_raw_logprob=False,
                     top_logprobs_num=0, future_inputs=True)
    out = {}
    assert queued_behind_sleep(lambda: out.setdefault("u", copy_decode_inputs(plan, graphs, 4, 4, [0.25, 0.5, 0.75])))
    assert out["u"].dtype == torch.float64 and out["u"].data_ptr() % 16 == 0
    assert out["u"].cpu().tolist() == [0.25, 0.5, 0.75]
    static = graphs.static_batch(4)
    assert static.positions.cpu().tolist() == [5, 6, 7, 0] and static.req_rows.cpu().tolist() == [1, 2, 3, 4]
    assert static.seq_lens.cpu().tolist() == [6, 7, 8, 1]
    assert queued_behind_sleep(lambda: out.setdefault("d", draws_to_device([0.5, 0.125], device)))
    assert out["d"].cpu().tolist() == [0.5, 0.125]
