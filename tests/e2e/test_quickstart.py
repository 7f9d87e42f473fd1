"""The embedded default model and the quickstart script, run the way the README runs them."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys

from rollout.default_model import DEFAULT_MODEL_NAME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(cache: str) -> dict[str, str]:
    env = {**os.environ, "ROLLOUT_CACHE": cache, "PYTHON": sys.executable}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def test_default_model_written_once_atomically_and_deterministically(tmp_path):
    cache = str(tmp_path / "cache")
    code = "from rollout.default_model import default_model_path; print(default_model_path())"
    # Two first uses at the same time: both get the same complete directory.
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=_env(cache), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    paths = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert paths[0] == paths[1] == os.path.join(cache, DEFAULT_MODEL_NAME)
    assert os.listdir(cache) == [DEFAULT_MODEL_NAME]  # no temporary directory left behind

    from rollout.config import ModelConfig
    from rollout.default_model import default_model_path

    cfg = ModelConfig.from_pretrained(paths[0])
    assert (
        cfg.architecture,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.max_position_embeddings,
    ) == ("Qwen3ForCausalLM", 256, 4, 8, 4, 32, 512, 4096)
    other = default_model_path(str(tmp_path / "other"))
    names = sorted(os.listdir(other))
    assert "tokenizer.json" in names and names == sorted(os.listdir(paths[0]))
    match, mismatch, errors = filecmp.cmpfiles(paths[0], other, names, shallow=False)
    assert not mismatch and not errors, mismatch


def test_run_quickstart_script(tmp_path):
    """``rollout serve`` with no --model (default model), the quickstart, and a clean stop."""
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "examples", "run_quickstart.sh")],
        env=_env(str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "GRPO group: n = 8" in out and "reused the prompt's KV" in out
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(-?[\d.]+)\s+(\d+)\s+(stop|length|abort)\s", out, re.M)
    assert [int(r[0]) for r in rows] == list(range(8)), out
    assert sum(int(r[3]) > 0 for r in rows) >= 7  # cached tokens: the group shares its prompt
    assert "paused: True (in_place)" in out
    assert "finished with 256 tokens, reason length" in out
    assert "quickstart done" in out
