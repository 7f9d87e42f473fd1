"""examples/async_grpo.py, a short CPU run: the reward must climb, and the plot must be written.

Why these margins. The run trains 80 steps of 8 prompts x 16 samples on addition of digits 0..4,
after 25 supervised steps that leave the reward near 0.2-0.3. Over 10-step windows, four seeds
climbed by 0.37-0.47 (to 0.61-0.73). The same runs with each batch's rewards shuffled among its
samples (updates of the same size that carry no information) moved by -0.03 and -0.05; a window's
mean over 80 prompts has a spread of about 0.05. So a climb of 0.2 is out of reach of uninformed
training and well inside what learning gives. The last window must also beat 0.4: the best answer
that ignores the prompt ("4", right for 5 of the 25 problems) scores 0.2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.conftest import REPO_ROOT

STEPS = 80
WINDOW = 10
MIN_CLIMB = 0.2
MIN_FINAL = 0.4


def test_async_grpo_climbs_on_cpu(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "examples/async_grpo.py", "--steps", str(STEPS), "--seed", "0",
                           "--out-dir", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())
    assert len(history) >= STEPS - 5, "nearly every step must have trained and pushed"
    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW
    assert last >= first + MIN_CLIMB and last >= MIN_FINAL, f"reward {first:.3f} -> {last:.3f}"
    # Pushes landed mid-generation: samples spanning two versions were trained on.
    assert sum(h["partial"] for h in history) > 0
    # Each token's version names the weights that sampled it: the trainer, recomputing under those
    # weights, agrees with the engine's logprobs on most steps, far closer than under the weights
    # being trained (a wrong version would make the two gaps alike).
    gaps = sorted(h["gap_behaviour"] for h in history)
    current = sorted(h["gap_current"] for h in history)
    assert gaps[len(gaps) // 2] < 1e-4 < current[len(current) // 2]
    assert (out / "async_grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean reward: first" in proc.stdout
