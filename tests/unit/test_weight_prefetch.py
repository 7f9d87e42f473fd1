"""The L2 weight prefetch of a decoder layer: off unless asked for, and nothing on CPU either way."""

from __future__ import annotations

import torch

from rollout.layers import weight_prefetch
from rollout.layers.weight_prefetch import WeightPrefetch


def test_prefetch_is_off_by_default(monkeypatch):
    monkeypatch.delenv("ROLLOUT_L2_PREFETCH", raising=False)
    assert not weight_prefetch.enabled()
    monkeypatch.setenv("ROLLOUT_L2_PREFETCH", "1")
    assert weight_prefetch.enabled()


def test_prefetch_does_nothing_on_cpu(monkeypatch):
    """Asked for on a CPU step, start forks no stream (there is none to rejoin) and join is a no-op."""
    monkeypatch.setenv("ROLLOUT_L2_PREFETCH", "1")
    w = torch.randn(8, 8)
    prefetch = WeightPrefetch([w])
    prefetch.start(torch.randn(2, 8))
    assert prefetch._side is None
    prefetch.join()
    assert not weight_prefetch._side_streams
