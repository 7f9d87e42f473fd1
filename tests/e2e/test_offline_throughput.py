"""examples/offline_throughput.py: the streamed run and the ``--generate`` run (one ``Engine.generate``
call) produce the workload's exact token counts, and only the streamed run reports TTFT and ITL."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys

from examples import offline_throughput as example
from rollout.testing.benchmark import Workload, summarize
from tests.e2e.conftest import REPO_ROOT


def test_generate_mode_counts_the_same_tokens_without_latencies(engine) -> None:
    wl = Workload.random(6, 8, 24, 4, 12, engine.limits.vocab_size, seed=0)
    streamed = summarize(*asyncio.run(example.run_workload(engine, wl, 0.6)))
    batched = summarize(*example.run_generate(engine, wl, 0.6))
    for f in (streamed, batched):
        assert f["successful_requests"] == 6
        # ignore_eos: every request generates exactly its drawn length.
        assert f["total_output_tokens"] == sum(wl.output_lens)
        assert f["total_input_tokens"] == sum(map(len, wl.prompts))
    assert not math.isnan(streamed["mean_itl_ms"]) and not math.isnan(streamed["mean_ttft_ms"])
    assert math.isnan(batched["mean_itl_ms"]) and math.isnan(batched["mean_ttft_ms"])


def test_generate_mode_refuses_batch1() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "examples/offline_throughput.py", "--generate", "--batch1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--generate times the batch as a whole" in proc.stderr
