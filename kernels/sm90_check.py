"""Compile every kernel for sm_90 on any machine (no GPU needed) and report its resources.

CPU tests run the kernels in Triton's interpreter, which executes them as Python: code that only
the compiler rejects (a non-constexpr global, an unsupported construct) and tile choices that
spill registers or overflow shared memory pass there unnoticed. This compiles each kernel at its
default tiles with the specialisations a real launch gets (16-byte aligned pointers, strides that
are multiples of 16, unit strides as constants) and reads registers and spills off the cubin::

    python -m kernels.sm90_check            # table
    python -m kernels.sm90_check --strict   # exit 1 on a failure, a spill or too much shared memory

Run it without ``TRITON_INTERPRET`` set (the interpreter replaces the compiler's kernel objects).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import gemv, l2_prefetch
from kernels.attention import decode, decode_merge, decode_plan, extend
from kernels.moe import fused_moe, routing
from kernels.triton_utils import interpreting

H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90
_DIV16 = [["tt.divisibility", 16]]


@dataclass(frozen=True, slots=True)
class KernelBuild:
    """Resources of one compiled kernel; ``registers`` / ``spill_bytes`` are None when no cuobjdump."""

    label: str
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    uses_wgmma: bool


def _source(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any], floats: tuple[str, ...]) -> ASTSource:
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = _DIV16
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("hidden", "inter"):
                attrs[(i,)] = _DIV16
    consts = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    return ASTSource(fn, signature, constexprs=consts, attrs=attrs)


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def build(label: str, src: ASTSource, num_warps: int, num_stages: int) -> KernelBuild:
    """Compile ``src`` for sm_90 and read its resources."""
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                  num_stages=num_stages))
    registers, spills = _resources(kernel.asm["cubin"])
    return KernelBuild(label, kernel.metadata.shared, registers, spills, "wgmma" in kernel.asm["ptx"])


def default_builds(dtype: str) -> list[tuple[str, ASTSource, int, int]]:
    """Each kernel at the tiles its launcher picks for Qwen3-like shapes (head_dim 128, GQA 2)."""
    t = "*" + dtype
    precision = "ieee" if dtype == "fp32" else "tf32"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    block_m, block_n, warps, stages = extend.default_tiles(128, torch_dtype)
    decode_n, decode_warps, decode_stages = decode_plan.default_tiles(torch_dtype)
    attn = dict(q_ptr=t, k_ptr=t, v_ptr=t, out_ptr=t, kv_indices_ptr="*i64", kv_starts_ptr="*i64",
                kv_lens_ptr="*i32",
                qo_indptr_ptr="*i32", counts_ptr="*i32", first_ptr="*i32", owner_ptr="*i32", mid_o_ptr="*fp32",
                mid_lse_ptr="*fp32", pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", qw_ptr=t, kw_ptr=t,
                slot_ptr="*i64")
    common = dict(HEAD_DIM=128, BLOCK_D=128, PRECISION=precision, UPCAST=False)
    out = [
        (f"decode split {dtype}", _source(decode._decode_split_kernel, attn,
                                          dict(GROUP=2, BLOCK_H=16, BLOCK_N=decode_n, DIRECT=False, ROPE=False,
                                               HAS_NORM=False, EARLY=False, **common),
                                          ("scale_log2", "eps")),
         decode_warps, decode_stages),
        (f"decode merge {dtype}", _source(decode_merge._decode_merge_kernel, attn,
                                          dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=16), ()), 4, 1),
        (f"extend {dtype}", _source(extend._extend_kernel, attn,
                                    dict(GROUP=2, BLOCK_M=block_m, BLOCK_N=block_n, **common), ("scale_log2",)),
         warps, stages),
    ]
    # The decode-from-qkv split kernel in each form a step takes: split, one piece per request
    # (direct), split with the first KV tile loaded before the PDL wait (early), at the default
    # tiles, then at the other tiles decode_tiles picks for those forms.
    forms = [("", False, False, None), (" direct", True, False, None), (" early", False, True, None)]
    forms += [(f" {name} {n}/{w}/{st}", direct, not direct, (n, w, st)) for name, direct, (n, w, st) in (
        ("early", False, (64, 4, 5)), ("early", False, (32, 4, 5)), ("direct", True, (128, 4, 3)))]
    for form, direct, early, tiles in forms:
        n, w, st = tiles or (decode_n, decode_warps, decode_stages)
        out.append((f"decode split qkv{form} {dtype}", _source(
            decode._decode_split_kernel, attn, dict(GROUP=2, BLOCK_H=16, BLOCK_N=n, DIRECT=direct, ROPE=True,
                                                    HAS_NORM=True, EARLY=early, **common),
            ("scale_log2", "eps")),
            w, st))
    # The skinny matmul in its largest form (norm, residual, gate), at a config of each kernel.
    skinny = dict(x_ptr=t, w_ptr=t, b_ptr=t, out_ptr=t, r_ptr=t, nw_ptr=t, s_ptr=t)
    normed = dict(HAS_BIAS=False, GATED=True, NORM=True, HAS_RESIDUAL=True)
    out.append((f"gemv normed gated {dtype}", _source(gemv._gemv_kernel, skinny, dict(
        BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, PRECISION=precision, UPCAST=False, **normed), ("eps",)), 4, 4))
    out.append((f"gemv fma normed gated {dtype}", _source(gemv._gemv_fma_kernel, skinny, dict(
        ROWS=1, BLOCK_N=2, BLOCK_K=1024, **normed), ("eps",)), 4, 3))
    out.append((f"l2 prefetch {dtype}", _source(l2_prefetch._prefetch_kernel, dict(p0=t, p1=t, p2=t), dict(NUM=3), ()),
                4, 1))
    moe = dict(x_ptr=t, w_ptr=t, act_ptr=t, out_ptr=t, weights_ptr="*fp32", sorted_ids_ptr="*i32",
               block_experts_ptr="*i32")
    for rows, phase in ((256 * 8, "decode"), (4096 * 8, "prefill")):
        cfg = fused_moe.default_config(rows, 128)
        for name, fn, gemm in (("gate_up", fused_moe._gate_up_kernel, cfg.gate_up),
                               ("down", fused_moe._down_kernel, cfg.down)):
            tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=gemm.block_n, BLOCK_K=gemm.block_k, PRECISION=precision,
                         UPCAST=False, stride_wk=1)
            out.append((f"moe {name} {phase} {dtype}", _source(fn, moe, tiles, ()), gemm.num_warps, gemm.num_stages))
    out.append((f"moe combine {dtype}", _source(fused_moe._combine_kernel, dict(y_ptr=t, ids_ptr="*i64", out_ptr=t),
                                                dict(TOP_K=8, BLOCK_H=1024, SKIP_NEGATIVE=False), ()), 4, 1))
    out.append(("moe router top-k", _source(routing._topk_softmax_kernel,
                                            dict(logits_ptr=t, weights_ptr="*fp32", ids_ptr="*i64"),
                                            dict(TOP_K=8, K_PAD=8, E_PAD=128, BLOCK_T=16, RENORMALIZE=True), ()),
                4, 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--strict", action="store_true", help="exit 1 on a compile failure, a spill or shared overflow")
    args = p.parse_args()
    if interpreting():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")
    bad = 0
    for dtype in args.dtypes:
        for label, src, warps, stages in default_builds(dtype):
            try:
                b = build(label, src, warps, stages)
            except Exception as exc:  # report every kernel, then fail
                print(f"FAIL {label}: {type(exc).__name__}: {exc}")
                bad += 1
                continue
            over = b.shared_bytes > H100_SHARED_BYTES or bool(b.spill_bytes)
            bad += over
            print(f"{'OVER' if over else 'ok  '} {b.label:28s} warps={warps} stages={stages} "
                  f"shared={b.shared_bytes:6d} regs={b.registers} spill={b.spill_bytes} wgmma={b.uses_wgmma}")
    if args.strict and bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
