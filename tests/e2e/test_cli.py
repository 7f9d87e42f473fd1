"""``rollout serve`` as a command: what it prints, and how it fails."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e.conftest import REPO_ROOT


def test_a_bad_model_exits_non_zero_without_announcing_the_address(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    missing = str(tmp_path / "no-such-model")
    done = subprocess.run([sys.executable, "-m", "rollout", "serve", "--port", "0", "--model", missing],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "no config.json" in output, output
    # Scripts take this line to mean "ready": it must never appear for a server that did not start.
    assert "listening on" not in output, output
