"""Where models come from: directories, the embedded default model, Hugging Face Hub ids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from rollout.errors import InvalidArgumentError, UnavailableError
from rollout.model_source import looks_like_hub_id, resolve_model_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_hub_cache(cache: str, repo_id: str, model_dir: str) -> str:
    """Lay ``model_dir`` out as huggingface_hub's cache does (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(model_dir, snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch) -> None:
    assert looks_like_hub_id("Qwen/Qwen3-0.6B")
    assert not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("./rel/dir")
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("bad--name/x")
    existing = tmp_path / "org"
    (existing / "model").mkdir(parents=True)
    # An existing directory wins over the Hub even when its relative name looks like an id.
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/model") == "org/model"


def test_a_hub_id_in_the_cache_resolves_offline(tmp_path, tiny_model_dir) -> None:
    snapshot = _fake_hub_cache(str(tmp_path / "hub"), "acme/tiny-qwen3", tiny_model_dir("qwen3"))
    path = resolve_model_path("acme/tiny-qwen3", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    assert os.path.realpath(path) == os.path.realpath(snapshot)
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_a_hub_id_that_cannot_be_fetched_names_the_id_and_the_way_out(tmp_path) -> None:
    with pytest.raises(UnavailableError) as info:
        resolve_model_path("acme/not-here", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    message = info.value.message
    assert "'acme/not-here'" in message and "Hugging Face" in message and "hf download acme/not-here" in message
    assert "no config.json" not in message


def test_a_missing_directory_says_what_a_model_is(tmp_path) -> None:
    from rollout.config import ModelConfig

    missing = str(tmp_path / "no-such-model")
    assert resolve_model_path(missing) == missing  # not an id: the loader reports it
    with pytest.raises(InvalidArgumentError, match="Hub id such as 'Qwen/Qwen3-0.6B'"):
        ModelConfig.from_pretrained(missing)


def test_serve_with_an_unreachable_hub_id_fails_naming_it(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-m", "rollout", "serve", "--port", "0", "--model", "acme/not-here"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "'acme/not-here' is not a local directory" in output and "HF_HUB_OFFLINE" in output, output
    assert "listening on" not in output, output


def test_engine_without_a_path_runs_the_default_model(tmp_path, monkeypatch) -> None:
    from rollout import Engine
    from rollout.default_model import DEFAULT_MODEL_NAME

    monkeypatch.setenv("ROLLOUT_CACHE", str(tmp_path))
    with Engine() as engine:
        assert engine.info().model_path == os.path.join(str(tmp_path), DEFAULT_MODEL_NAME)
        out = engine.generate(text="Hello", sampling_params={"max_new_tokens": 2, "temperature": 0})
        assert out[0].completion_tokens == 2
