"""Shared fixtures: tiny random Hugging Face models written once per session, GPU markers."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "multi_gpu" in item.keywords and have_gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2+ CUDA GPUs"))
        elif "gpu" in item.keywords and have_gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Return a function arch -> path of a small random model of that architecture (cached)."""
    from rollout.models.random_init import write_random_model

    made: dict[tuple, str] = {}

    def make(arch: str = "qwen3", **kw) -> str:
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"model-{arch}")
            made[key] = write_random_model(str(path), arch, **kw)
        return made[key]

    return make
