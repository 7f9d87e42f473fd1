"""Zero-pause weight swaps on a real device: the shadow's memory moves behind the live addresses (VMM),
CUDA graphs captured over them read the new weights, and the shadow's memory is held only for the swap."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from memory_saver import MemoryRegion
from rollout import Engine, SamplingParams
from rollout.types import SwapResult
from tests.weight_helpers import perturb_checkpoint

pytestmark = pytest.mark.gpu

MIB = 1 << 20


def free_bytes() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def test_adopt_moves_memory_behind_the_same_addresses_and_graphs_follow() -> None:
    region = MemoryRegion("weights", "cuda")
    arena = region.allocate(64 * MIB)
    w = arena.take((16 * MIB // 4,), torch.float32)  # 16 MiB of "weights"
    w.fill_(1.0)
    out = torch.empty_like(w)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out.copy_(w * 2.0)  # captures w's address
    graph.replay()
    assert out[0].item() == 2.0
    base = free_bytes()
    shadow = region.shadow(arena)
    assert base - free_bytes() >= arena.nbytes  # the shadow holds memory of its own for the swap window
    shadow.data[: w.numel() * 4].view(torch.float32).fill_(3.0)
    ptr = w.data_ptr()
    start = time.perf_counter()
    arena.adopt(shadow)
    took_ms = (time.perf_counter() - start) * 1e3
    assert w.data_ptr() == ptr and torch.all(w == 3.0)
    graph.replay()  # the captured address now reads the shadow's memory
    assert torch.all(out == 6.0)
    assert free_bytes() >= base - MIB  # the old memory went back to the driver: no more than before
    print(f"adopt of {arena.nbytes / MIB:.0f} MiB took {took_ms:.2f} ms")
    region.close()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=1024,
                          init_std=0.08, dtype="bfloat16", max_position_embeddings=1 << 15)


def _wait_until(done, what: str, seconds: float = 30.0) -> None:
    """Poll ``done()`` until it holds; fail naming ``what`` after ``seconds`` (never hang)."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s"
        time.sleep(0.01)


def test_engine_swap_keeps_addresses_and_graphs_and_matches_a_fresh_engine(model_dir, engine_cores,
                                                                            tmp_path) -> None:
    _, new_dir = perturb_checkpoint(model_dir, str(tmp_path), seed=11)
    prompts = [[7, 8, 9, 10, 11], [300, 301, 302], [5] * 40]
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    opts = dict(device="cuda", dtype="bfloat16", attention_backend="triton", kv_memory_fraction=0.3)
    with Engine(new_dir, **opts) as fresh:
        want = [o.output_ids for o in fresh.generate(prompts, sp)]
    with Engine(model_dir, **opts) as engine:
        runner = engine_cores[-1].runner
        assert runner.graphs is not None
        before = [o.output_ids for o in engine.generate(prompts, sp)]
        assert before != want
        ptrs = [p.data_ptr() for p in runner.model.parameters()]
        versions: list[int] = []
        # Long enough to outlast the swap: a 4000-token stream (capped at a 2048-token context) ended
        # before the swap did on the H200, and the wait for its next tokens never ended.
        long = SamplingParams(temperature=0.0, max_new_tokens=30000, ignore_eos=True)

        def read() -> None:
            for chunk in engine.stream([1, 2, 3], long, request_id="long"):
                versions.extend(chunk.weight_versions)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        _wait_until(lambda: len(versions) >= 5, "the stream did not start")
        base = free_bytes()
        assert engine.update_weights_from_disk(new_dir, version=1, swap=True) == SwapResult(1, swapped=True)
        assert reader.is_alive(), "the stream ended before the swap did: it cannot show generation went on"
        assert free_bytes() >= base - 64 * MIB  # the shadow was released after the switch
        n = len(versions)
        _wait_until(lambda: len(versions) >= n + 5, "no tokens after the swap")
        engine.abort("long")
        reader.join(timeout=30)
        k = versions.index(1)
        assert versions == [0] * k + [1] * (len(versions) - k)
        assert [p.data_ptr() for p in runner.model.parameters()] == ptrs and runner.graphs is not None
        assert [o.output_ids for o in engine.generate(prompts, sp)] == want
        engine.check_integrity()
