"""Weight updates on one GPU: CUDA IPC from this (trainer) process into an engine process."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
import torch
from safetensors.torch import save_file

import weight_sync
from rollout import SamplingParams
from rollout.engine_process import start_engine_process
from rollout.errors import InvalidArgumentError
from rollout.models.loader import iter_checkpoint
from rollout.request_validation import make_add_request

pytestmark = pytest.mark.gpu

PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 14, 15, 16, 17, 90, 91], [200, 3, 45]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
OPTS = dict(device="cuda", dtype="bfloat16", max_total_tokens=8192)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3", hidden_size=256, intermediate_size=512, head_dim=64, init_std=0.08)


@pytest.fixture(scope="module")
def perturbed(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], str]:
    gen = torch.Generator().manual_seed(7)
    weights = {n: t * (1 + 0.1 * torch.randn(t.shape, generator=gen)) for n, t in iter_checkpoint(model_dir)}
    path = str(tmp_path_factory.mktemp("perturbed-gpu"))
    for f in os.listdir(model_dir):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, f), path)
    save_file({n: t.contiguous() for n, t in weights.items()}, os.path.join(path, "model.safetensors"))
    return weights, path


def client_outputs(client) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        req = make_add_request(uuid.uuid4().hex, input_ids=p, text=None, sampling=GREEDY, limits=client.limits,
                               tokenizer=None, stream=False)
        out.append([t for chunk in client.stream(req) for t in chunk.token_ids])
    return out


def test_ipc_update_equals_engine_loaded_from_disk(model_dir, perturbed) -> None:
    weights, path = perturbed
    reference = start_engine_process(path, **OPTS)
    try:
        want = client_outputs(reference)
    finally:
        reference.shutdown()
    engine = start_engine_process(model_dir, **OPTS)
    try:
        assert client_outputs(engine) != want
        trainer = {n: t.to("cuda", torch.bfloat16) for n, t in weights.items()}
        # A non-contiguous and a host tensor take the packed path; the rest is shared in place.
        down = "model.layers.0.mlp.down_proj.weight"
        trainer[down] = trainer[down].t().contiguous().t()
        trainer["model.norm.weight"] = trainer["model.norm.weight"].cpu()
        assert weight_sync.push_tensors_ipc([engine], trainer.items(), version=4) == 4
        assert client_outputs(engine) == want
        assert engine.call("info").weight_version == 4
        # The same allocations again: handles are opened and closed once per update.
        assert weight_sync.push_tensors_ipc([engine], trainer.items(), bucket_bytes=4096) == 5
        assert client_outputs(engine) == want
        bad = dict(trainer)
        bad["model.norm.weight"] = torch.zeros(3, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(InvalidArgumentError, match="model.norm.weight"):
            weight_sync.push_tensors_ipc([engine], bad.items(), version=6)
        info = engine.call("info")
        assert info.weight_version == 5 and info.weights_valid
        assert client_outputs(engine) == want
    finally:
        engine.shutdown()
