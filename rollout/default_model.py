"""The embedded default model: a small Qwen3-shaped model with random weights, a tokenizer and a
chat template (ChatML, with tools).

It lets ``rollout serve`` and the examples run anywhere with no download. It is written once,
deterministically, under ``$ROLLOUT_CACHE`` (or ``~/.cache/rollout``) and reused afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# v2: the tokenizer carries a chat template. What is written (shape, files) is part of the name:
# change it only together with DEFAULT_MODEL_NAME, so that caches written before are not reused.
DEFAULT_MODEL_NAME = "default-qwen3-tiny-v2"
DEFAULT_MODEL_SHAPE = dict(
    arch="qwen3",
    seed=0,
    vocab_size=512,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=4096,
    dtype="float32",
)


def cache_root(cache_dir: str | None = None) -> str:
    """Where rollout keeps generated files: ``cache_dir``, else $ROLLOUT_CACHE, else ~/.cache/rollout."""
    root = cache_dir or os.environ.get("ROLLOUT_CACHE") or os.path.join("~", ".cache", "rollout")
    return os.path.abspath(os.path.expanduser(root))


def default_model_path(cache_dir: str | None = None) -> str:
    """Return the directory of the default model, writing it on first use.

    Concurrent first uses are safe: each writer fills a private temporary directory beside the
    target and renames it into place; a writer that loses the race discards its copy.
    """
    root = cache_root(cache_dir)
    path = os.path.join(root, DEFAULT_MODEL_NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from rollout.testing.random_model import write_random_model

    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=root)
    try:
        write_random_model(tmp, **DEFAULT_MODEL_SHAPE)
        try:
            os.rename(tmp, path)  # atomic on one file system; fails if another writer got there first
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
