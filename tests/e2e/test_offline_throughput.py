"""examples/offline_throughput.py on the embedded default model (CPU): the streamed run and the
``--generate`` run (one ``Engine.generate`` call) produce the workload's exact token counts, and only
the streamed run reports TTFT and ITL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.e2e.conftest import REPO_ROOT


def _run(tmp_path, *flags: str) -> dict:
    out = tmp_path / f"offline{'-'.join(flags)}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "examples/offline_throughput.py", "--num-prompts", "6", "--json", str(out),
                           *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_generate_mode_counts_the_same_tokens_without_latencies(tmp_path) -> None:
    streamed, batched = _run(tmp_path), _run(tmp_path, "--generate")
    for f in (streamed, batched):
        assert f["successful_requests"] == 6
        assert f["output_throughput"] == f["total_output_tokens"] / f["duration_s"]
    # ignore_eos with seeded lengths: both runs generate exactly the workload's tokens.
    assert batched["total_output_tokens"] == streamed["total_output_tokens"] > 6
    assert batched["total_input_tokens"] == streamed["total_input_tokens"]
    assert not math.isnan(streamed["mean_itl_ms"]) and not math.isnan(streamed["mean_ttft_ms"])
    assert math.isnan(batched["mean_itl_ms"]) and math.isnan(batched["mean_ttft_ms"])


def test_generate_mode_refuses_batch1() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "examples/offline_throughput.py", "--generate", "--batch1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--generate times the batch as a whole" in proc.stderr
