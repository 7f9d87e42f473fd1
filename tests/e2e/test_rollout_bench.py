"""examples/rollout_bench.py in its CPU quick mode: every sample finishes at its drawn length, and the
printed figures agree with each other and with the per-sample results the same run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rollout.testing.rollout_workload import RolloutWorkload
from tests.e2e.conftest import REPO_ROOT


def test_quick_rollout_step_figures_are_consistent(tmp_path) -> None:
    out = tmp_path / "rollout.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "examples/rollout_bench.py", "--quick", "--seed", "3", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    args = result["args"]

    # The lengths are the seeded draw: rebuilding the workload from the same arguments gives them.
    again = RolloutWorkload.build(
        num_prompts=args["prompts"], samples=args["samples"], prefix_len=args["prefix_len"],
        prompt_len=args["prompt_len"], max_new_tokens=args["max_new_tokens"],
        median_new_tokens=args["median_new_tokens"], sigma=args["sigma"], vocab=result["vocab"], seed=3)
    assert result["output_lens"] == again.output_lens
    lens = {f"p{i}-s{j}": n for i, row in enumerate(again.output_lens) for j, n in enumerate(row)}
    assert len(set(lens.values())) > 3 and max(lens.values()) == args["max_new_tokens"]  # a long tail, not one length
    prompt_tokens = again.num_samples * (args["prefix_len"] + args["prompt_len"])

    figures = result["figures"]
    assert set(figures) == {"cache on", "cache off"}
    for name, f in figures.items():
        samples = result["samples"][name]
        # All samples finished by length at exactly their drawn length, with a logprob per token.
        assert len(samples) == again.num_samples == f["successful_requests"] == f["samples"]
        for s in samples:
            want = lens[s["id"]]
            assert s["finish_reason"] == "length", s
            assert s["completion_tokens"] == s["streamed_tokens"] == s["logprobs"] == s["target"] == want, s
        assert f["total_output_tokens"] == sum(lens.values()) == again.total_output_tokens
        assert f["total_input_tokens"] == prompt_tokens
        # Makespan is the last sample's end; the tail is a part of it that holds the last samples' ends.
        ends = sorted(s["finish_s"] for s in samples)
        assert abs(f["makespan_s"] - ends[-1]) < 1e-9
        assert 0 < f["tail_s"] <= f["makespan_s"]
        assert abs(f["tail_s"] - (ends[-1] - ends[-f["tail_samples"] - 1])) < 1e-9
        assert 0 < f["tail_tokens"] <= f["total_output_tokens"]
        assert abs(f["output_throughput"] * f["makespan_s"] - f["total_output_tokens"]) < 1e-6
        # Hit rate: the engine's cached counts over all prompt tokens, never above a perfect cache.
        cached = sum(s["cached_tokens"] for s in samples)
        assert f["cached_tokens"] == cached <= again.best_cached_tokens()
        assert abs(f["prefix_hit_rate"] - cached / prompt_tokens) < 1e-12
        for kind in ("ttft", "itl"):
            assert 0 < f[f"p50_{kind}_ms"] <= f[f"p90_{kind}_ms"] <= f[f"p99_{kind}_ms"]
        assert f["p99_ttft_ms"] <= f["makespan_s"] * 1e3
    # Sharing: every later sample of a prompt reuses it with the cache on; nothing is reused with it off.
    assert figures["cache on"]["prefix_hit_rate"] > 0.5
    assert figures["cache off"]["prefix_hit_rate"] == 0 and figures["cache off"]["cached_tokens"] == 0

    # The short table is printed last and shows the same figures.
    lines = proc.stdout.strip().splitlines()
    table = {line[:24].strip(): line[24:].split() for line in lines[-6:]}
    assert lines[-8].startswith("rollout step")
    on, off = figures["cache on"], figures["cache off"]
    assert table["makespan (s)"][:2] == [f"{on['makespan_s']:.3f}", f"{off['makespan_s']:.3f}"]
    assert table["output tok/s"][:2] == [f"{on['output_throughput']:.1f}", f"{off['output_throughput']:.1f}"]
    assert table["tail, last 10% (s)"] == [f"{on['tail_s']:.3f}", f"{off['tail_s']:.3f}"]
    assert table["prefix-cache hit rate"][:2] == [f"{on['prefix_hit_rate']:.1%}", "0.0%"]
