"""Weight updates over NCCL: this process (trainer, GPU 0) pushes to an engine process on GPU 1."""

from __future__ import annotations

import pytest
import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.errors import InvalidArgumentError
from tests.weight_helpers import client_outputs as engine_outputs
from tests.weight_helpers import perturb_checkpoint

pytestmark = pytest.mark.multi_gpu

PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 14, 15, 16, 17, 90, 91], [200, 3, 45]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
OPTS = dict(device="cuda:1", dtype="bfloat16", max_total_tokens=8192)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3", hidden_size=256, intermediate_size=512, head_dim=64, init_std=0.08)


@pytest.fixture(scope="module")
def perturbed(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], str]:
    """Every weight changed by a few percent, and an HF directory holding them (for the oracle)."""
    return perturb_checkpoint(model_dir, str(tmp_path_factory.mktemp("perturbed-nccl")), seed=7)


def client_outputs(client) -> list[list[int]]:
    """Greedy outputs of an engine process, through its EngineClient."""
    return engine_outputs(client, PROMPTS, GREEDY)


def test_nccl_push_between_two_gpus(model_dir, perturbed) -> None:
    weights, path = perturbed
    reference = Engine(path, separate_process=True, **OPTS)
    try:
        want = client_outputs(reference)
    finally:
        reference.shutdown()
    engine = Engine(model_dir, separate_process=True, **OPTS)
    try:
        assert client_outputs(engine) != want
        trainer = [(n, t.to("cuda:0", torch.bfloat16)) for n, t in weights.items()]
        with weight_sync.connect([engine], backend="nccl", bucket_bytes=64 << 10, timeout_s=120,
                                 device="cuda:0") as group:
            assert not torch.distributed.is_initialized()  # the default process group stays untouched
            assert group.push(trainer, version=3) == 3
            assert client_outputs(engine) == want
            bad = dict(trainer)
            bad["model.norm.weight"] = torch.zeros(3, device="cuda:0", dtype=torch.bfloat16)
            with pytest.raises(InvalidArgumentError, match="model.norm.weight"):
                group.push(bad.items(), version=9)
            assert group.push(trainer, version=4) == 4  # the group survived the rejection
            assert client_outputs(engine) == want
        assert engine.info().weight_version == 4
        # Destroyed and formed again.
        with weight_sync.connect([engine], backend="nccl", timeout_s=120, device="cuda:0") as again:
            assert again.push(trainer) == 5
        assert client_outputs(engine) == want
    finally:
        engine.shutdown()
