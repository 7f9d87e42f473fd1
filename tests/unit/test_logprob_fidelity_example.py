"""examples/logprob_fidelity.py in its quick mode: it runs, and its figures say what they should."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fidelity_example_quick(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "logprob_fidelity.py"), "--quick", "--num-prompts", "4",
         "--max-new-tokens", "8", "--work-dir", str(tmp_path), "--modes", "default", "deterministic"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        if " / HF " in line:
            label, rest = line[:52].strip(), line[52:].split()
            rows[label] = [float(x.rstrip("%")) for x in rest]
    assert len(rows) == 8  # 2 engine dtypes x 2 modes x 2 trainer dtypes
    for label, (tokens, mean, p99, mx, mse, share) in rows.items():  # share in percent
        assert tokens == 32, label
        assert 0 <= mean <= p99 <= mx, label
        assert mse >= 0 and 0 <= share <= 100, label
    # float32 engine against the float32 trainer: the same model up to summation order.
    assert rows["float32 auto default / HF float32"][1] < 1e-4
    assert rows["float32 auto deterministic / HF float32"][1] < 1e-4
    # bfloat16 rounding puts the bfloat16 engine much further from float32 than that.
    assert rows["bfloat16 auto default / HF float32"][1] > 100 * rows["float32 auto default / HF float32"][1]
