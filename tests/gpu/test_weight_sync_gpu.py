"""Weight updates on one GPU: CUDA IPC from this (trainer) process into an engine process."""

from __future__ import annotations

import pytest
import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from tests.weight_helpers import client_outputs as engine_outputs
from tests.weight_helpers import perturb_checkpoint

pytestmark = pytest.mark.gpu

PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 14, 15, 16, 17, 90, 91], [200, 3, 45]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
OPTS = dict(device="cuda", dtype="bfloat16", max_total_tokens=8192)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3", hidden_size=256, intermediate_size=512, head_dim=64, init_std=0.08)


@pytest.fixture(scope="module")
def perturbed(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], str]:
    """Every weight changed by a few percent, and an HF directory holding them (for the oracle)."""
    return perturb_checkpoint(model_dir, str(tmp_path_factory.mktemp("perturbed-gpu")), seed=7)


def client_outputs(client) -> list[list[int]]:
    """Greedy outputs of an engine process, through its EngineClient."""
    return engine_outputs(client, PROMPTS, GREEDY)


def disk_reference(path: str) -> list[list[int]]:
    """Greedy outputs of an engine process that loaded ``path`` from disk (what a push must give)."""
    reference = Engine(path, separate_process=True, **OPTS)
    try:
        return client_outputs(reference)
    finally:
        reference.shutdown()


def test_ipc_update_equals_engine_loaded_from_disk(model_dir, perturbed) -> None:
    weights, path = perturbed
    want = disk_reference(path)
    engine = Engine(model_dir, separate_process=True, **OPTS)
    try:
        assert client_outputs(engine) != want
        trainer = {n: t.to("cuda", torch.bfloat16) for n, t in weights.items()}
        # A non-contiguous and a host tensor take the packed path; the rest is shared in place.
        down = "model.layers.0.mlp.down_proj.weight"
        trainer[down] = trainer[down].t().contiguous().t()
        trainer["model.norm.weight"] = trainer["model.norm.weight"].cpu()
        assert weight_sync.push_tensors_ipc([engine], trainer.items(), version=4) == 4
        assert client_outputs(engine) == want
        assert engine.info().weight_version == 4
        # The same allocations again: handles are opened and closed once per update.
        assert weight_sync.push_tensors_ipc([engine], trainer.items(), bucket_bytes=4096) == 5
        assert client_outputs(engine) == want
        bad = dict(trainer)
        bad["model.norm.weight"] = torch.zeros(3, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(InvalidArgumentError, match="model.norm.weight"):
            weight_sync.push_tensors_ipc([engine], bad.items(), version=6)
        info = engine.info()
        assert info.weight_version == 5 and info.weights_valid
        assert client_outputs(engine) == want
    finally:
        engine.shutdown()


def test_ipc_update_in_two_calls_is_one_update(model_dir, perturbed) -> None:
    """``more`` over CUDA IPC: generation waits for the last call, and the two calls give the weights
    that one full push gives, tagged with the first call's version."""
    weights, path = perturbed
    want = disk_reference(path)
    engine = Engine(model_dir, separate_process=True, **OPTS)
    try:
        trainer = [(n, t.to("cuda", torch.bfloat16)) for n, t in weights.items()]
        half = len(trainer) // 2
        assert weight_sync.push_tensors_ipc([engine], trainer[:half], version=8, more=True) == 8
        with pytest.raises(FailedPreconditionError, match="waits for its last call"):
            client_outputs(engine)
        assert engine.info().weight_version == 0
        assert weight_sync.push_tensors_ipc([engine], trainer[half:]) == 8
        assert client_outputs(engine) == want
        info = engine.info()
        assert info.weight_version == 8 and info.weights_valid
    finally:
        engine.shutdown()


def training_step_in_another_process(fraction: float) -> float:
    """A separate process takes ``fraction`` of the free GPU memory and runs bf16 matmuls on it."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "free, total = torch.cuda.mem_get_info()\n"
        f"n = int(free * {fraction})\n"
        "blob = torch.empty(n, dtype=torch.uint8, device='cuda')\n"
        "blob.fill_(1)\n"
        "a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)\n"
        "for _ in range(20):\n"
        "    a = torch.nn.functional.normalize(a @ a, dim=-1)\n"
        "torch.cuda.synchronize()\n"
        "print(n / total)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_colocated_cycle_release_train_push_resume(model_dir, perturbed) -> None:
    """generate, pause, release(kv_cache, weights), a training step taking most of the GPU in another
    process, resume(weights), push new weights over CUDA IPC, resume(kv_cache), generate correctly."""
    weights, path = perturbed
    want = disk_reference(path)
    # The KV pool is sized from free memory, as in a real deployment.
    engine = Engine(model_dir, separate_process=True, device="cuda", dtype="bfloat16", kv_memory_fraction=0.6)
    try:
        before = client_outputs(engine)
        assert before != want
        engine.pause("retract")
        free0 = torch.cuda.mem_get_info()[0]
        states = engine.release_memory(["kv_cache", "weights"])
        assert states["kv_cache"]["state"] == "released" and states["weights"]["state"] == "released"
        freed = torch.cuda.mem_get_info()[0] - free0
        share = training_step_in_another_process(0.9)
        print(f"released {freed / 2**30:.2f} GiB; the training step held {share:.0%} of the GPU")
        assert share > 0.5
        engine.resume_memory(["weights"])
        trainer = {n: t.to("cuda", torch.bfloat16) for n, t in weights.items()}
        assert weight_sync.push_tensors_ipc([engine], trainer.items(), version=11) == 11
        engine.resume_memory(["kv_cache"])
        engine.continue_()
        assert client_outputs(engine) == want
        info = engine.info()
        assert info.weight_version == 11 and info.weights_valid
        assert all(m["state"] == "active" for m in info.memory.values())
    finally:
        engine.shutdown()
