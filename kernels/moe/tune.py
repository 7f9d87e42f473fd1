"""Tune the fused MoE's tiles for one expert shape on this GPU and write them where
``fused_experts_triton`` looks them up (``kernels/moe/configs``, see ``kernels.moe.tuned_configs``)::

    python3 -m kernels.moe.tune --shape qwen3-30b-a3b
    python3 -m kernels.moe.tune --experts 128 --hidden 2048 --intermediate 768 --top-k 8 --dtype bfloat16 \\
        --token-counts 1,2,4,8,16,32,64,128,256,512,1024,2048,4096
    python3 -m kernels.moe.tune --shape qwen3-30b-a3b --dry-run     # the search space only, no GPU needed

For each token count: route the tokens (softmax top-k of random logits with a per-expert bias, so
some experts are busier than others, as in trained routers); take the expert alignment at each row
tile worth trying; run every compiled variant of each GEMM once and check its output against the
default config's (every row written, within 2% of its scale); time it from a CUDA graph over cold
weights; keep per row tile the fastest gate/up and the fastest down variant, and per token count the
row tile with the least alignment + gate/up + down time. The winner and ``default_config`` are then
timed whole (alignment, both GEMMs, the combine) and the winner's output is checked against the fp32
torch reference; where the winner is not faster the default is written. The file is rewritten after
each token count, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from kernels.moe.align import ExpertAlignment
from kernels.moe.config import MoeKernelConfig, default_config
from kernels.moe.fused_moe import align_rows, fused_experts_triton, launch_down, launch_gate_up
from kernels.moe.tune_bench import Problem, default_workers, error_text, precompile, time_us
from kernels.moe.tune_space import DOWN, GATE_UP, Variant, block_ms_for, default_variants, variants
from kernels.moe.tuned_configs import PACKAGE_CONFIG_DIR, config_file_name, device_name, load_table, save_table
from kernels.triton_utils import interpreting

# name -> (experts, hidden, moe intermediate, top-k)
SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "qwen3-235b-a22b": (128, 4096, 1536, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
}
DEFAULT_TOKENS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096"
CHECK_TOLERANCE = 2e-2  # of the default output's largest magnitude


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a preset; explicit sizes below override it")
    p.add_argument("--experts", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int, help="the full moe_intermediate_size (divided by --tp)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: each rank holds intermediate / tp")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--token-counts", default=DEFAULT_TOKENS, help="comma-separated batch sizes to tune")
    p.add_argument("--out-dir", type=Path, default=PACKAGE_CONFIG_DIR, help="where the JSON file goes")
    p.add_argument("--workers", type=int, default=default_workers(), help="compile processes (0: none)")
    p.add_argument("--copies", type=int, default=4, help="weight copies cycled through while timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run under TRITON_INTERPRET=1")
    p.add_argument("--dry-run", action="store_true", help="print the search space and the output path, then stop")
    args = p.parse_args(argv)
    preset = SHAPES.get(args.shape, (None,) * 4)
    for name, value in zip(("experts", "hidden", "intermediate", "top_k"), preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if None in (args.experts, args.hidden, args.intermediate, args.top_k):
        p.error("give --shape or all of --experts --hidden --intermediate --top-k")
    if args.intermediate % args.tp:
        p.error(f"--intermediate {args.intermediate} is not divisible by --tp {args.tp}")
    args.tokens = sorted({int(t) for t in args.token_counts.split(",") if t.strip()})
    if not args.tokens or args.tokens[0] < 1:
        p.error("--token-counts must be positive integers")
    return args


def search_space(problem: Problem, tokens: list[int]) -> dict[int, dict[str, list[Variant]]]:
    """Row tile -> kernel -> variants, for every row tile some token count tries; defaults included."""
    e, h, i = problem.experts, problem.hidden, problem.inter
    space: dict[int, dict[str, list[Variant]]] = {}
    for t in tokens:
        for bm in block_ms_for(t * problem.top_k, e):
            space.setdefault(bm, {GATE_UP: variants(GATE_UP, bm, i, h), DOWN: variants(DOWN, bm, h, i)})
        for v in default_variants(t * problem.top_k, e):
            if v not in space[v.block_m][v.kernel]:
                space[v.block_m][v.kernel].append(v)
    return space


@dataclass(slots=True)
class Case:
    """One token count's inputs and the default config's outputs (the check's reference)."""

    x: torch.Tensor  # (T, H)
    flat_w: torch.Tensor  # (N,) routing weights
    ids: torch.Tensor  # (T, k)
    act_ref: torch.Tensor  # (N, I)
    y_ref: torch.Tensor  # (N, H)
    act: torch.Tensor = field(init=False)  # a variant's outputs
    y: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.act, self.y = torch.empty_like(self.act_ref), torch.empty_like(self.y_ref)


def mismatch(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Why a variant's output is wrong (a row left unwritten, off the default's beyond the tolerance)."""
    if not torch.isfinite(out).all():
        return "rows left unwritten or not finite"
    err = (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)
    return f"differs from the default config's output by {err:.1e}" if err > CHECK_TOLERANCE else None


class Tuner:
    """The buffers of one shape and the per-token-count search."""

    def __init__(self, problem: Problem, copies: int, seed: int, max_tokens: int, device: torch.device) -> None:
        self.p = problem
        self.copies = copies
        self.device = device
        self.failed: dict[Variant, str] = {}
        self.loaded: set[Variant] = set()
        self.compiled_here = 0  # variants the main process had to compile (slow first launch)
        e, h, i, dt = problem.experts, problem.hidden, problem.inter, problem.dtype
        gen = self.gen = torch.Generator(device=device).manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, device=device, generator=gen)
        self.x = randn(max_tokens, h).to(dt)
        self.w13 = [(randn(e, 2 * i, h) * h**-0.5).to(dt) for _ in range(copies)]
        self.w2 = [(randn(e, h, i) * i**-0.5).to(dt) for _ in range(copies)]
        self.bias = randn(e) * 0.5  # uneven expert popularity, as trained routers have

    def route(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        from rollout.layers.moe import select_experts_reference

        logits = torch.randn(tokens, self.p.experts, device=self.device, generator=self.gen) + self.bias
        return select_experts_reference(logits, self.p.top_k, renormalize=True)

    def _try(self, v: Variant, run, check) -> float | None:
        """Check ``v`` once (``run(0)`` then ``check()``), then time ``run``; None when it fails."""
        if v in self.failed:
            return None
        try:
            begin = time.perf_counter()
            run(0)
            if v not in self.loaded and time.perf_counter() - begin > 0.5 and self.device.type == "cuda":
                self.compiled_here += 1  # the workers' on-disk cache did not serve it
            self.loaded.add(v)
            bad = check()
            if bad:
                raise ValueError(bad)
            return time_us(run, self.copies, self.device)
        except Exception as exc:  # compile, launch or check failure: drop the variant for all batch sizes
            self.failed[v] = error_text(exc)
            print(f"    skipped {v.label()}: {self.failed[v]}", flush=True)
            return None

    def tune(self, tokens: int, space: dict[int, dict[str, list[Variant]]]) -> tuple[MoeKernelConfig, float, float]:
        """(best config, its time, the default's time) in microseconds of the whole MoE for ``tokens``."""
        p, x = self.p, self.x[:tokens]
        weights, ids = self.route(tokens)
        rows = tokens * p.top_k
        empty = lambda cols: torch.empty(rows, cols, dtype=p.dtype, device=self.device)
        case = Case(x, weights.reshape(-1).contiguous(), ids, empty(p.inter), empty(p.hidden))
        dflt = default_config(rows, p.experts)
        ref_align = align_rows(ids, p.experts, dflt.block_m, False)
        launch_gate_up(x, self.w13[0], case.act_ref, ref_align, p.top_k, dflt.gate_up)
        launch_down(case.act_ref, self.w2[0], case.y_ref, case.flat_w, ref_align, dflt.down)
        best: tuple[float, MoeKernelConfig] | None = None
        for bm in block_ms_for(rows, p.experts):
            align = align_rows(ids, p.experts, bm, False)
            align_us = time_us(lambda i, bm=bm: align_rows(ids, p.experts, bm, False), self.copies, self.device)
            gate_up = self._fastest(case, align, space[bm][GATE_UP])
            down = self._fastest(case, align, space[bm][DOWN])
            if gate_up is None or down is None:
                continue
            print(f"    block_m {bm:3d}: align {align_us:6.1f} + gate/up {gate_up[0]:8.1f} ({gate_up[1].label()}) "
                  f"+ down {down[0]:8.1f} ({down[1].label()}) us", flush=True)
            total = align_us + gate_up[0] + down[0]
            if best is None or total < best[0]:
                best = (total, MoeKernelConfig(bm, gate_up[1].tiles, down[1].tiles))
        whole = lambda cfg: time_us(lambda i: fused_experts_triton(x, self.w13[i], self.w2[i], weights, ids,
                                                                    config=cfg), self.copies, self.device)
        default_us = whole(dflt)
        if best is None:
            return dflt, default_us, default_us
        tuned_us = whole(best[1])
        if tuned_us >= default_us or not self._check_whole(best[1], x, weights, ids):
            return dflt, default_us, default_us
        return best[1], tuned_us, default_us

    def _fastest(self, case: Case, align: ExpertAlignment, todo: list[Variant]) -> tuple[float, Variant] | None:
        """The fastest of ``todo`` (variants of one GEMM at the alignment's row tile) that passes its check."""
        p = self.p
        timed = []
        for v in todo:
            if v.kernel == GATE_UP:
                out, ref = case.act, case.act_ref
                run = lambda i, v=v, out=out: launch_gate_up(case.x, self.w13[i], out, align, p.top_k, v.tiles)
            else:
                out, ref = case.y, case.y_ref
                run = lambda i, v=v, out=out: launch_down(case.act_ref, self.w2[i], out, case.flat_w, align, v.tiles)
            out.fill_(float("nan"))  # a row the variant fails to write then fails the check
            us = self._try(v, run, lambda out=out, ref=ref: mismatch(out, ref))
            if us is not None:
                timed.append((us, v))
        return min(timed, key=lambda r: r[0]) if timed else None

    def _check_whole(self, cfg: MoeKernelConfig, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> bool:
        """The chosen config's MoE against the fp32 torch reference: within 2% of its scale (the bf16
        kernels land within 1%; a broken config lands far off)."""
        from rollout.layers.moe import fused_experts_reference

        out = fused_experts_triton(x, self.w13[0], self.w2[0], weights, ids, config=cfg)
        exact = fused_experts_reference(x.float(), self.w13[0].float(), self.w2[0].float(), weights, ids)
        err = (out.float() - exact).abs().max().item() / exact.abs().max().item()
        if not err <= 2e-2:
            print(f"    WARNING: {cfg} is off the fp32 reference by {err:.1e}; the default is kept", flush=True)
        return err <= 2e-2


def fmt(t) -> str:
    return f"{t.block_n}/{t.block_k}/{t.num_warps}/{t.num_stages}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    problem = Problem(args.experts, args.hidden, args.intermediate // args.tp, args.top_k, getattr(torch, args.dtype))
    space = search_space(problem, args.tokens)
    count = sum(len(vs) for per in space.values() for vs in per.values())
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    name = "<this GPU>" if device.type == "cuda" and not torch.cuda.is_available() else device_name(device)
    path = (args.out_dir / config_file_name(problem.experts, problem.inter, problem.hidden, problem.dtype,
                                            name)).resolve()
    print(f"E={problem.experts} H={problem.hidden} N={problem.inter} top-{problem.top_k} {args.dtype}, "
          f"tokens {args.tokens}: {count} kernel variants over block_m {sorted(space)}")
    print(f"output: {path}", flush=True)
    if args.dry_run:
        return
    if (device.type == "cuda") == interpreting() or (device.type == "cuda" and not torch.cuda.is_available()):
        raise SystemExit("tuning needs a CUDA GPU with TRITON_INTERPRET unset (or --device cpu under the "
                         "interpreter, a smoke run whose times mean nothing)")
    start = time.time()
    tuner = Tuner(problem, args.copies, args.seed, max(args.tokens), device)
    todo = [v for per in space.values() for vs in per.values() for v in vs]
    tuner.failed.update(precompile(problem, todo, args.workers, device))
    print(f"compiled {len(todo)} variants in {time.time() - start:.0f} s with {args.workers} processes; "
          f"{len(tuner.failed)} failed", flush=True)
    results: dict[int, tuple[MoeKernelConfig, float, float]] = {}
    meta = {"device": name, "dtype": args.dtype, "experts": problem.experts, "hidden": problem.hidden,
            "intermediate": problem.inter, "triton": triton.__version__}
    for tokens in args.tokens:
        print(f"  {tokens} tokens ({time.time() - start:.0f} s)", flush=True)
        results[tokens] = tuner.tune(tokens, space)
        extra = {t: {"us": round(r[1], 2), "default_us": round(r[2], 2)} for t, r in results.items()}
        save_table(path, problem.top_k, {t: r[0] for t, r in results.items()}, extra, meta)
    table = load_table(path)  # the file reads back to the configs chosen
    assert [table.nearest(t * problem.top_k) for t in args.tokens] == [results[t][0] for t in args.tokens]
    print(f"\n{'tokens':>6} {'block_m':>7} {'gate_up n/k/w/s':>16} {'down n/k/w/s':>14} {'tuned us':>9} "
          f"{'default us':>10} {'speed-up':>8}")
    for t, (cfg, us, dus) in results.items():
        print(f"{t:6d} {cfg.block_m:7d} {fmt(cfg.gate_up):>16} {fmt(cfg.down):>14} {us:9.1f} {dus:10.1f} "
              f"{dus / us:7.2f}x")
    print(f"\nwrote {path} in {time.time() - start:.0f} s ({len(tuner.failed)} variants skipped, "
          f"{tuner.compiled_here} compiled outside the worker processes)")


if __name__ == "__main__":
    sys.exit(main())
