"""Logprob fidelity: how far the engine's logprobs are from a trainer's recomputation.

Generates a rollout batch with the engine (temperature 1, no filters, so the returned logprobs are
the model's own), recomputes the logprobs of exactly those tokens with a teacher-forced Hugging
Face forward on the same weights, in the engine's dtype and in float32, and prints mean, p99 and
max |delta logp|, mean (exp(delta) - 1)^2 and the share of tokens beyond 0.1, per engine dtype,
attention backend and mode (default, deterministic, float32 LM head). Also the rollout's output
tok/s, to show what each mode costs.

    python examples/logprob_fidelity.py --quick                     # CPU, tiny model, seconds
    python examples/logprob_fidelity.py --shape qwen3-0.6b --train-steps 300 --device cuda \
        --dtypes bfloat16 --backends triton flashinfer --num-prompts 256 --max-new-tokens 512

``--train-steps N`` trains the random model N steps on arithmetic progressions first
(``rollout.testing.trained_model``), so its distributions are peaked like a real checkpoint's;
``--train-steps 0`` keeps the random weights (say which in any report).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch

from rollout import Engine, SamplingParams
from rollout.testing.benchmark import MODEL_SHAPES
from rollout.testing.fidelity import Rollout, deltas, format_table, load_trainer, summarize, trainer_logprobs
from rollout.testing.random_model import write_random_model
from rollout.testing.trained_model import progression, train_briefly

QUICK_SHAPE = dict(arch="qwen3", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)


def prepare_model(args: argparse.Namespace) -> str:
    """The model directory: ``--model``, or a random model of ``--shape`` (trained if asked)."""
    if args.model:
        return args.model
    shape = dict(QUICK_SHAPE if args.shape == "quick" else MODEL_SHAPES[args.shape])
    arch = shape.pop("arch")
    root = args.work_dir or tempfile.mkdtemp(prefix="fidelity-")
    base = os.path.join(root, f"{args.shape}-random")
    if not os.path.exists(os.path.join(base, "config.json")):
        write_random_model(base, arch, init_std=0.02, **shape)
    if args.train_steps <= 0:
        return base
    trained = os.path.join(root, f"{args.shape}-trained-{args.train_steps}")
    if not os.path.exists(os.path.join(trained, "config.json")):
        t = time.perf_counter()
        train_briefly(base, trained, steps=args.train_steps, device=args.device, batch=args.train_batch)
        print(f"trained {args.train_steps} steps in {time.perf_counter() - t:.1f} s")
    return trained


def prompts(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Progressions (what a trained model continues confidently) of 8 to 64 tokens."""
    rng = random.Random(seed)
    return [progression(rng.randrange(vocab), rng.randrange(1, 8), rng.randint(8, 64), vocab) for _ in range(num)]


def rollout_batch(model_dir: str, args: argparse.Namespace, dtype: str, backend: str, deterministic: bool,
                  fp32_lm_head: bool) -> tuple[list[Rollout], float]:
    """The engine's rollouts of the prompt batch and its output tok/s (after one warm-up request)."""
    opts = dict(device=args.device, dtype=dtype, deterministic=deterministic, fp32_lm_head=fp32_lm_head)
    if backend != "auto":
        opts["attention_backend"] = backend
    with Engine(model_dir, **opts) as engine:
        ps = prompts(args.num_prompts, engine.limits.vocab_size)
        sp = [SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=i, ignore_eos=True)
              for i in range(len(ps))]
        engine.generate(ps[0], sp[0])
        t = time.perf_counter()
        outs = engine.generate(ps, sp, return_logprob=True)
        seconds = time.perf_counter() - t
    rollouts = [Rollout(p, o.output_ids, o.output_logprobs) for p, o in zip(ps, outs)]
    return rollouts, sum(len(r.tokens) for r in rollouts) / seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: a random model of --shape)")
    ap.add_argument("--shape", default="quick", choices=["quick", *sorted(MODEL_SHAPES)])
    ap.add_argument("--train-steps", type=int, default=None, help="default: 0 (random) with --quick, else 300")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--work-dir", help="where models are written (default: a fresh temporary directory)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=None, help="engine dtypes (default: bfloat16 float32)")
    ap.add_argument("--backends", nargs="+", default=["auto"], help="attention backends: auto torch triton ...")
    ap.add_argument("--modes", nargs="+", default=["default", "deterministic", "fp32_lm_head"],
                    choices=["default", "deterministic", "fp32_lm_head"])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--trainer-batch", type=int, default=8, help="sequences per trainer forward")
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 prompts, 16 new tokens (CPU tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.max_new_tokens = min(args.num_prompts, 8), min(args.max_new_tokens, 16)
    if args.train_steps is None:
        args.train_steps = 0 if args.quick else 300
    dtypes = args.dtypes or ["bfloat16", "float32"]
    model_dir = prepare_model(args)
    weights = f"trained {args.train_steps} steps" if args.train_steps > 0 else "random weights"
    print(f"model {model_dir} ({weights}), "
          f"device {args.device}, {args.num_prompts} prompts x {args.max_new_tokens} new tokens, temperature 1")

    results = []  # (engine label, rollouts, tok/s)
    for dtype in dtypes:
        for backend in args.backends:
            for mode in args.modes:
                if mode == "fp32_lm_head" and dtype == "float32":
                    continue  # the head is float32 already
                if mode == "deterministic" and backend == "flashinfer":
                    continue  # the mode refuses flashinfer (its splits follow the batch)
                rollouts, tok_s = rollout_batch(model_dir, args, dtype, backend, mode == "deterministic",
                                                mode == "fp32_lm_head")
                results.append((f"{dtype} {backend} {mode}", rollouts, tok_s))
    rows = []
    for trainer_dtype in sorted({*dtypes, "float32"}):
        trainer = load_trainer(model_dir, getattr(torch, trainer_dtype), args.device)
        for label, rollouts, _ in results:
            ref = trainer_logprobs(trainer, rollouts, args.trainer_batch)
            rows.append((f"{label} / HF {trainer_dtype}", summarize(deltas(rollouts, ref))))
        del trainer
    print(format_table(rows))
    print()
    for label, _, tok_s in results:
        print(f"{label:<40} rollout output tok/s {tok_s:>12.1f}")


if __name__ == "__main__":
    main()
