"""Tuned MoE configs: the file format and lookup, the search space, and a tuner run in the interpreter.

Without CUDA the kernels run in Triton's interpreter; with CUDA the same tests compile them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.moe import GemmTiles, MoeKernelConfig, default_config, fused_experts_triton  # noqa: E402
from kernels.moe.fused_moe import select_config  # noqa: E402
from kernels.moe.tune_space import (  # noqa: E402
    DOWN,
    GATE_UP,
    SHARED_LIMIT,
    block_ms_for,
    default_variants,
    shared_bytes,
    variants,
)
from kernels.moe.tuned_configs import (  # noqa: E402
    CONFIG_DIR_ENV,
    config_file_name,
    device_name,
    load_table,
    save_table,
    tuned_config,
)
from kernels.triton_utils import interpreting  # noqa: E402
from rollout.layers.moe import fused_experts_reference, select_experts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
A = MoeKernelConfig(16, GemmTiles(32, 256, 4, 4), GemmTiles(64, 128, 4, 3))
B = MoeKernelConfig(32, GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 8, 2))
C = MoeKernelConfig.uniform(64, 128, 64, 8, 3)


def test_config_file_name():
    assert (config_file_name(128, 768, 2048, torch.bfloat16, "NVIDIA H200")
            == "E=128,N=768,H=2048,dtype=bfloat16,device=NVIDIA_H200.json")
    assert config_file_name(8, 16, 32, torch.float32, "NVIDIA H100 80GB HBM3").endswith(
        "dtype=float32,device=NVIDIA_H100_80GB_HBM3.json")


def test_round_trip_and_nearest_by_rows(tmp_path):
    """Entries are token counts at the file's top-k; a call picks the entry nearest its rows by ratio."""
    path = tmp_path / "t.json"
    save_table(path, 8, {4: B, 1: A, 64: C}, extra={1: {"us": 12.5}}, meta={"device": "x"})
    assert json.loads(path.read_text())["configs"]["1"]["us"] == 12.5  # extra keys are kept, then ignored
    table = load_table(path)
    assert table.top_k == 8 and table.rows == (8, 32, 512) and table.configs == (A, B, C)
    picks = [table.nearest(r) for r in (1, 8, 15, 16, 17, 32, 100, 128, 129, 512, 10**6)]
    assert picks == [A, A, A, B, B, B, B, C, C, C, C]
    # rows 16: 16 / 8 == 32 / 16, a tie: the larger entry. Rows 128: 128 / 32 == 512 / 128, the larger too.


@pytest.mark.parametrize("body,match", [
    ("not json", "Expecting value"),
    ('{"format": 2, "top_k": 8, "configs": {}}', "format is not 1"),
    ('{"format": 1, "top_k": 8, "configs": {"x": {}}}', "token count 'x'"),
    ('{"format": 1, "top_k": 8, "configs": {"1": {"block_m": 16, "gate_up": {"block_n": 24, "block_k": 64, '
     '"num_warps": 4, "num_stages": 3}, "down": {}}}}', r"configs\[1\].gate_up: block_n=24"),
])
def test_malformed_files_are_rejected_naming_the_file(tmp_path, body, match):
    path = tmp_path / "bad.json"
    path.write_text(body)
    with pytest.raises(ValueError, match=match) as err:
        load_table(path)
    assert str(path) in str(err.value)


def test_lookup_reads_the_directory_given_or_the_env_var(tmp_path, monkeypatch):
    dev = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu")
    save_table(tmp_path / config_file_name(4, 16, 32, torch.float32, device_name(dev)), 2, {1: A, 64: C})
    assert tuned_config(4, 16, 32, torch.float32, dev, 3, directory=tmp_path) == A
    assert tuned_config(4, 16, 32, torch.float32, dev, 100, directory=tmp_path) == C
    assert tuned_config(4, 16, 32, torch.bfloat16, dev, 3, directory=tmp_path) is None  # other dtype: no file
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    assert tuned_config(4, 16, 32, torch.float32, dev, 100) == C


def make_moe(tokens=6, experts=4, top_k=2, hidden=32, inter=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    return [t.to(DEVICE) for t in (x, w13, w2, weights, ids)]


def test_fused_experts_take_the_tiles_of_the_config_file(tmp_path, monkeypatch):
    """A file for this shape, dtype and device is read by ``fused_experts_triton`` (a broken one raises,
    naming it); without one ``default_config`` is used."""
    x, w13, w2, weights, ids = make_moe()
    name = config_file_name(4, 16, 32, torch.float32, device_name(x.device))
    assert select_config(x, w13, 12) == default_config(12, 4)  # no file in the package for this shape
    broken, good = tmp_path / "broken", tmp_path / "good"
    broken.mkdir()
    (broken / name).write_text("{")
    monkeypatch.setenv(CONFIG_DIR_ENV, str(broken))
    with pytest.raises(ValueError, match="bad MoE config file .*broken"):
        fused_experts_triton(x, w13, w2, weights, ids)
    tuned = MoeKernelConfig(16, GemmTiles(16, 16, 4, 2), GemmTiles(32, 16, 2, 3))  # several K steps, masked N
    save_table(good / name, 2, {4: tuned})
    monkeypatch.setenv(CONFIG_DIR_ENV, str(good))
    assert select_config(x, w13, 12) == tuned
    out = fused_experts_triton(x, w13, w2, weights, ids)
    ref = fused_experts_reference(x, w13, w2, weights, ids)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_search_space_is_pruned_and_holds_the_defaults():
    """The Qwen3-30B-A3B space: every variant fits shared memory, known spills are out, the default
    tiles are in; the row tiles tried follow the rows per expert and include the default's."""
    total = 0
    for bm in (16, 32, 64, 128):
        for kernel, n, k in ((GATE_UP, 768, 2048), (DOWN, 2048, 768)):
            vs = variants(kernel, bm, n, k)
            total += len(vs)
            assert all(shared_bytes(kernel, bm, v.tiles) <= SHARED_LIMIT for v in vs)
    assert total <= 400  # about one second of compile each, spread over the tuner's processes
    assert GemmTiles(128, 256, 4, 4) not in [v.tiles for v in variants(GATE_UP, 16, 768, 2048)]  # spills
    for tokens in (1, 64, 256, 1024, 4096):
        rows = tokens * 8
        gate_up, down = default_variants(rows, 128)
        assert gate_up in variants(GATE_UP, gate_up.block_m, 768, 2048)
        assert down in variants(DOWN, down.block_m, 2048, 768)
        assert default_config(rows, 128).block_m in block_ms_for(rows, 128)
    assert block_ms_for(8, 128) == [16] and block_ms_for(4096 * 8, 128) == [32, 64, 128]


@pytest.mark.skipif(not interpreting(), reason="the CPU smoke run needs the Triton interpreter")
def test_tuner_runs_and_writes_a_file_that_reads_back(tmp_path, capsys):
    """The whole tuner on a tiny shape in the interpreter (times mean nothing there): it checks and
    times the variants, writes the file under the name the lookup uses, and prints the table."""
    from kernels.moe.tune import main

    main(["--experts", "4", "--hidden", "16", "--intermediate", "16", "--top-k", "2", "--token-counts", "1",
          "--device", "cpu", "--copies", "1", "--out-dir", str(tmp_path)])
    path = tmp_path / config_file_name(4, 16, 16, torch.bfloat16, "cpu")
    table = load_table(path)
    assert table.top_k == 2 and table.rows == (2,)
    assert tuned_config(4, 16, 16, torch.bfloat16, torch.device("cpu"), 2, directory=tmp_path) == table.configs[0]
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "speed-up" in out
