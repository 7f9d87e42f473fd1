"""Loading a Hugging Face safetensors checkpoint (single file or sharded) into a model in place."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from rollout.config import ModelConfig
from rollout.distributed.tp import SINGLE, TPGroup
from rollout.errors import InvalidArgumentError, quoted
from rollout.models.registry import build_model

logger = logging.getLogger(__name__)

_INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_path: str) -> list[str]:
    """The safetensors files of a model directory, in the order the index (or the names) give."""
    index_path = os.path.join(model_path, _INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        paths = [os.path.join(model_path, name) for name in files]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise InvalidArgumentError(
                f"shards listed in {_INDEX_FILE} are missing: {missing}", field="model_path"
            )
        return paths
    paths = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not paths:
        raise InvalidArgumentError(f"no *.safetensors files in {quoted(model_path)}", field="model_path")
    return paths


def iter_checkpoint(model_path: str, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, one shard open at a time.

    ``progress``: a progress bar over the checkpoint's bytes (tqdm, on a terminal only) and a log line
    when done, so a large load shows it is moving."""
    paths = checkpoint_files(model_path)
    total = sum(os.path.getsize(p) for p in paths)
    start = time.monotonic()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {len(paths)} safetensors file(s)",
              disable=None if progress else True, leave=False) as bar:
        for path in paths:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor
    if progress:
        seconds = time.monotonic() - start
        logger.info("read %.2f GB of weights from %d file(s) in %.1f s", total / 1e9, len(paths), seconds)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter in place with random values (norm weights near 1), on its device.

    For benchmarks of large shapes, where writing and reading a checkpoint would dominate.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)


def load_model(
    config: ModelConfig,
    model_path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    tp: TPGroup = SINGLE,
) -> nn.Module:
    """Build the model for ``config`` and fill every parameter from the checkpoint at ``model_path``.

    Raises ``InvalidArgumentError`` naming unexpected keys, keys of the wrong shape, or the
    checkpoint keys of parameters the checkpoint does not provide. ``load_format="dummy"`` skips
    the checkpoint and fills random weights instead. With ``tp`` each rank reads the whole checkpoint
    and keeps its own shard of every tensor.
    """
    model = build_model(config, dtype, device, tp)
    if load_format == "dummy":
        init_dummy_weights(model)
        return model.eval()
    seen: set[str] = set()

    def recorded() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_checkpoint(model_path, progress=True):
            seen.add(name)
            yield name, tensor

    written = model.load_weights(recorded())
    expected = model.param_names_for_checkpoint()
    unwritten = [name for name in expected if name not in written]
    # Name the absent checkpoint keys; fall back to our names if the checkpoint used another layout.
    missing = [key for name in unwritten for key in expected[name] if key not in seen] or unwritten
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise InvalidArgumentError(f"checkpoint is missing: {shown}", field="model_path")
    return model.eval()
