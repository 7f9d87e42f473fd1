"""Shared fixtures: tiny random Hugging Face models written once per session, GPU markers."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, i.e. at the first import of a kernel module; any
    # test may trigger that import, so it is set before all of them. The CPU runs kernels only in
    # Triton's interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
    from rollout.testing.random_model import write_random_model

    made: dict[tuple, str] = {}

    def make(arch: str = "qwen3", **kw) -> str:
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"model-{arch}")
            made[key] = write_random_model(str(path), arch, **kw)
        return made[key]

    return make


@pytest.fixture
def engine_cores(monkeypatch: pytest.MonkeyPatch) -> list:
    """The ``EngineCore`` of every in-thread engine built during the test, in order (to look at
    the pool's buffers and the runner directly)."""
    import rollout.engine.process as engine_process

    cores: list = []
    build = engine_process._build_core

    def keep(model_path, options):
        cores.append(build(model_path, options))
        return cores[-1]

    monkeypatch.setattr(engine_process, "_build_core", keep)
    return cores
