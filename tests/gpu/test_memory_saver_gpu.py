"""Releasable GPU memory on a real device: memory goes back to the driver, addresses and graphs survive."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

from memory_saver import MemorySaver, MemoryState
from rollout import Engine, SamplingParams

pytestmark = pytest.mark.gpu

GIB = 1 << 30


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def clean_allocator() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def other_process_allocates(nbytes: int) -> None:
    """A separate process (its own CUDA context) allocates and touches ``nbytes`` on the same GPU."""
    code = (
        "import torch, sys\n"
        f"x = torch.empty({nbytes}, dtype=torch.uint8, device='cuda')\n"
        "x.fill_(1)\n"
        "torch.cuda.synchronize()\n"
        "print('allocated', x.numel())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    print(f"another process allocated {nbytes / GIB:.2f} GiB")


def test_regions_release_to_the_driver_and_resume_at_the_same_addresses() -> None:
    clean_allocator()
    saver = MemorySaver("cuda", ("weights", "kv_cache", "cuda_graph"), backup_tags=["weights"])
    n = 256 << 20  # elements
    base_free = free_bytes()
    w = saver.region("weights").empty((n,), torch.bfloat16)  # 512 MiB
    kv = saver.region("kv_cache").empty((2, n), torch.float32)  # 2 GiB
    x = saver.region("cuda_graph").empty((n,), torch.float32)  # graph input
    y = saver.region("cuda_graph").empty((n,), torch.float32)  # graph output
    held = base_free - free_bytes()
    w.copy_(torch.linspace(-4, 4, n, device="cuda", dtype=torch.bfloat16))
    w_ref = w.clone()
    ptrs = [w.data_ptr(), kv.data_ptr(), x.data_ptr(), y.data_ptr()]

    graph = torch.cuda.CUDAGraph()
    x.fill_(1.0)
    kv.fill_(0.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.add(w.float() * x, kv[1], out=y)  # warm up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            torch.add(w.float() * x, kv[1], out=y)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(y, w_ref.float() + 0.5)
    del w_ref
    clean_allocator()

    before = free_bytes()
    assert saver.release() == ["weights", "kv_cache", "cuda_graph"]
    freed = free_bytes() - before
    print(f"regions held {held} bytes ({held / GIB:.2f} GiB); release freed {freed} bytes ({freed / GIB:.2f} GiB)")
    assert freed >= 0.95 * held
    assert saver.release() == []  # double release: nothing happens
    other_process_allocates(int(freed * 0.9))

    assert saver.resume() == ["weights", "kv_cache", "cuda_graph"]
    assert [w.data_ptr(), kv.data_ptr(), x.data_ptr(), y.data_ptr()] == ptrs
    assert all(r["state"] == "active" for r in saver.states().values())
    expected = torch.linspace(-4, 4, n, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(w, expected)  # backed up: contents restored
    assert int(kv.count_nonzero()) == 0  # not backed up: zeros
    x.fill_(2.0)
    kv.fill_(-1.0)
    graph.replay()  # the graph captured before the release reads and writes the remapped memory
    torch.cuda.synchronize()
    assert torch.allclose(y, expected.float() * 2.0 - 1.0)
    saver.close()
    assert saver.region("weights").state is MemoryState.CLOSED


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=1024,
                          init_std=0.08, dtype="bfloat16")


def test_engine_release_all_frees_95_percent_and_resumes_identically(model_dir, engine_cores) -> None:
    cores = engine_cores
    clean_allocator()
    base_free = free_bytes()
    prompts = [[7, 8, 9, 10, 11], [300, 301, 302], [5] * 40]
    sp = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True)
    with Engine(model_dir, device="cuda", dtype="bfloat16", attention_backend="triton",
                memory_backup_tags=("weights",)) as engine:
        runner = cores[0].runner
        ref = engine.generate(prompts, sp, return_logprob=True)
        held = base_free - free_bytes()
        weight_ptrs = [p.data_ptr() for p in runner.model.parameters()]
        kv_ptrs = [t.data_ptr() for t in runner.kv_pool.k_buffers + runner.kv_pool.v_buffers]

        assert runner.graphs is not None and engine.info().memory["cuda_graph"]["bytes"] > 0
        engine.pause("retract")
        before = free_bytes()
        states = engine.release_memory()
        assert runner.graphs is None and states["cuda_graph"]["state"] == "released"
        freed_total = free_bytes() - before
        engine_left = held - freed_total
        print(f"engine held {held} bytes ({held / GIB:.2f} GiB); release freed {freed_total} bytes "
              f"({freed_total / GIB:.2f} GiB); still held {engine_left} bytes; tags {states}")
        assert freed_total >= 0.95 * held
        other_process_allocates(int(freed_total * 0.9))

        engine.resume_memory(["weights"])
        assert runner.graphs is None  # captured again only once weights and KV are both back
        engine.resume_memory(["kv_cache", "cuda_graph"])
        assert runner.graphs is not None
        assert [p.data_ptr() for p in runner.model.parameters()] == weight_ptrs
        assert [t.data_ptr() for t in runner.kv_pool.k_buffers + runner.kv_pool.v_buffers] == kv_ptrs
        engine.continue_()
        outs = engine.generate(prompts, sp, return_logprob=True)  # replays the decode CUDA graphs
        engine.check_integrity()
    for o, r in zip(outs, ref):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-3
