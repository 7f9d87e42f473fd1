"""Loading progress: a checkpoint read with progress reports what it read, and reads the same tensors."""

from __future__ import annotations

import logging

import torch

from rollout.models.loader import iter_checkpoint


def test_checkpoint_read_with_progress_logs_and_yields_the_same_tensors(tiny_model_dir, caplog) -> None:
    path = tiny_model_dir("qwen3", max_shard_bytes=200_000)  # several shards
    plain = dict(iter_checkpoint(path))
    with caplog.at_level(logging.INFO, logger="rollout.models.loader"):
        shown = dict(iter_checkpoint(path, progress=True))
    assert plain.keys() == shown.keys() and all(torch.equal(plain[k], shown[k]) for k in plain)
    [record] = [r for r in caplog.records if "of weights from" in r.getMessage()]
    assert "file(s)" in record.getMessage() and " 1 file" not in record.getMessage()
