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
