"""Speculative decoding throughput against plain decoding, by batch size.

Llama-3.1-8B shape with random weights (``load_format="dummy"``), a prompt of ``--input-len``
random ids per sequence, ``--output-len`` greedy tokens each, for every batch size in
``--batch-sizes``. Methods: ``none`` (plain decoding), ``oracle`` (benchmarks only: each draft is
taken with probability ``--acceptance`` given the ones before it, so it measures what a drafter of
that acceptance rate would give, at zero drafting cost; its output is NOT the target's
distribution), ``ngram`` on a copy-heavy workload, beside plain decoding of the same workload.

The copy workload: every prompt is a cycle of 32 ids repeated, and the weights are changed (a
partial checkpoint loaded with ``update_weights_from_disk``) so that the model continues the cycle:
every layer's norm weights are zero, so the residual stream is the input embedding, and the
embedding of each id is the LM-head row of the id after it in its cycle. Every matmul and the
attention still run at full size, so a step costs what it costs on real weights; the output copies
the prompt, as code edits and quoting answers largely do, and n-gram lookups find it.

    python examples/spec_bench.py --device cuda --dtype bfloat16 --batch-sizes 1,2,4,8,16,32,64,128 \
        --methods none,oracle,ngram --acceptance 0.6,0.8 --num-draft-tokens 4

Prints one line per (method, acceptance, batch size): output tokens/s and the speed-up over plain
decoding of the same workload (``none-copy``: plain decoding of the copy workload).
Adaptive speculation turns drafts off above ``--max-spec-batch`` sequences.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

from rollout import Engine, SamplingParams
from rollout.testing.benchmark import MODEL_SHAPES


def model_dir(shape_name: str, dtype: str) -> str:
    from rollout.testing.random_model import write_random_model

    shape = dict(MODEL_SHAPES[shape_name])
    arch = shape.pop("arch")
    path = os.path.join(tempfile.gettempdir(), f"rollout-spec-bench-{shape_name}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_random_model(path, arch, dtype=dtype, write_weights=False, **shape)
    return path


CYCLE = 32  # ids per prompt cycle in the copy workload


def prompts(n: int, length: int, copy: bool, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random ids, or (``copy``) a cycle of ``CYCLE`` ids repeated; the cycles share no id."""
    rng = random.Random(seed)
    top = min(vocab, 30000)
    if copy:
        ids = rng.sample(range(10, top), n * CYCLE)
        return [(ids[i * CYCLE:(i + 1) * CYCLE] * (length // CYCLE + 1))[:length] for i in range(n)]
    return [[rng.randrange(10, top) for _ in range(length)] for _ in range(n)]


def copy_checkpoint(shape_name: str, cycles: list[list[int]], dtype: str, device: str) -> str:
    """A partial checkpoint that makes the model continue each of ``cycles`` (see the module doc)."""
    import torch
    from safetensors.torch import save_file

    shape = MODEL_SHAPES[shape_name]
    if shape.get("tie_word_embeddings"):
        raise SystemExit(f"the copy workload needs an LM head apart from the embedding; {shape_name} ties them")
    vocab, hidden = shape["vocab_size"], shape["hidden_size"]
    dt = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    head = torch.randn(vocab, hidden, generator=gen, device=device, dtype=torch.float32).to(dt)
    nxt = torch.arange(vocab, device=device)
    for cycle in cycles:
        ids = torch.tensor(cycle, device=device)
        nxt[ids] = ids.roll(-1)
    tensors = {"lm_head.weight": head, "model.embed_tokens.weight": head[nxt].contiguous(),
               "model.norm.weight": torch.ones(hidden, device=device, dtype=dt)}
    for i in range(shape["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.zeros(hidden, device=device, dtype=dt)
    path = tempfile.mkdtemp(prefix="rollout-spec-bench-copy-")
    save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return path


def run(path: str, args: argparse.Namespace, bs: int, options: dict, copy: bool) -> tuple[float, float | None]:
    """Output tokens/s, and the mean accepted length (tokens per target forward per sequence
    while speculating; None without speculation)."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.output_len, ignore_eos=True)
    ps = prompts(bs, args.input_len, copy, MODEL_SHAPES[args.shape]["vocab_size"])
    with Engine(path, device=args.device, dtype=args.dtype, load_format="dummy",
                max_running_requests=max(bs, 1), **options) as engine:
        if copy:
            ckpt = copy_checkpoint(args.shape, [p[:CYCLE] for p in ps], args.dtype, args.device)
            engine.update_weights_from_disk(ckpt)
            shutil.rmtree(ckpt)
        engine.generate(ps[:1], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))  # warm up
        t = time.perf_counter()
        before = engine.info()
        outs = engine.generate(ps, sp)
        dt = time.perf_counter() - t
        after = engine.info()
    verified = after.spec_verified - before.spec_verified
    accepted = after.spec_accepted - before.spec_accepted
    return sum(len(o.output_ids) for o in outs) / dt, (1 + accepted / verified) if verified else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--methods", default="none,oracle,ngram")
    ap.add_argument("--acceptance", default="0.6,0.8", help="oracle acceptance probabilities")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--max-spec-batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    path = model_dir(args.shape, args.dtype)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    plain: dict[tuple[int, bool], float] = {}  # (batch size, copy workload) -> plain tok/s
    methods = args.methods.split(",")
    if "ngram" in methods:  # n-gram runs on the copy workload: plain decoding of it first
        methods.insert(methods.index("ngram"), "none-copy")
    for method in methods:
        rates = [float(a) for a in args.acceptance.split(",")] if method == "oracle" else [None]
        copy = method in ("ngram", "none-copy")
        for acc in rates:
            for bs in sizes:
                options: dict = {}
                if not method.startswith("none"):
                    options = dict(speculative_method=method, num_draft_tokens=args.num_draft_tokens,
                                   speculative_max_batch_size=args.max_spec_batch)
                    if acc is not None:
                        options["oracle_acceptance"] = acc
                tok_s, accept_len = run(path, args, bs, options, copy)
                if method.startswith("none"):
                    plain[bs, copy] = tok_s
                speedup = f"{tok_s / plain[bs, copy]:.2f}x" if (bs, copy) in plain else "-"
                label = method if acc is None else f"{method}(a={acc})"
                length = f"{accept_len:.2f}" if accept_len is not None else "-"
                print(f"{label:16s} bs={bs:4d}  {tok_s:10.1f} tok/s  vs plain {speedup}  "
                      f"accepted length {length}", flush=True)

if __name__ == "__main__":
    main()
