"""Release / resume times and bytes given back, for an 8B-shaped model's weights and a large KV pool.

The weights of a Llama-3.1-8B-shaped model (random bf16, allocated directly in the ``weights``
region: no checkpoint) and ``--kv-gib`` of KV (or as much as fits) in the ``kv_cache`` region. Each
cycle releases both tags, measures what the driver sees free (``torch.cuda.mem_get_info``), resumes
them, and checks that the addresses are unchanged and the weights came back bit-identical (backup).

    python examples/memory_bench.py                    # 40 GiB of KV, weights backed up, 3 cycles
    python examples/memory_bench.py --kv-gib 20 --no-backup --cycles 5

The first release with a backup also allocates the pinned host buffer; later cycles reuse it.
"""

from __future__ import annotations

import argparse
import time

import torch

from memory_saver import ALIGNMENT, MemorySaver, align_up

GIB = 1 << 30
# Llama-3.1-8B: hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads of 128, vocab 128256.
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 32, 8, 128, 128256


def weight_shapes() -> list[tuple[int, ...]]:
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    layer = [(qkv, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTER, HIDDEN), (HIDDEN, INTER), (HIDDEN,), (HIDDEN,)]
    return [(VOCAB, HIDDEN)] + layer * LAYERS + [(HIDDEN,), (VOCAB, HIDDEN)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-gib", type=float, default=40.0, help="KV pool size (capped to what fits)")
    ap.add_argument("--no-backup", action="store_true", help="do not back the weights up to host memory")
    ap.add_argument("--cycles", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    torch.cuda.init()
    base_free = free_bytes()
    saver = MemorySaver("cuda", ("weights", "kv_cache", "cuda_graph"),
                        backup_tags=() if args.no_backup else ("weights",))
    shapes = weight_shapes()
    w_bytes = sum(align_up(2 * torch.Size(s).numel(), ALIGNMENT) for s in shapes)
    arena = saver.region("weights").allocate(w_bytes)
    weights = [arena.take(s, torch.bfloat16) for s in shapes]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for w in weights:
        w.normal_(0.0, 0.02, generator=gen)
    checksum = [w[:4].clone() for w in weights]  # a bit-exact sample of every tensor
    kv_bytes = int(min(args.kv_gib * GIB, free_bytes() - 4 * GIB))  # leave room for the context and temporaries
    saver.region("kv_cache").allocate(kv_bytes)
    held = base_free - free_bytes()
    ptrs = [a.ptr for tag in ("weights", "kv_cache") for a in saver.region(tag).arenas]
    n_params = sum(torch.Size(s).numel() for s in shapes)

    name = torch.cuda.get_device_name()
    print(f"GPU {name}; 8B-shaped weights: {n_params / 1e9:.2f} B params, bf16, "
          f"{saver.region('weights').nbytes / GIB:.2f} GiB (backup: {not args.no_backup}); "
          f"KV {saver.region('kv_cache').nbytes / GIB:.2f} GiB; held {held / GIB:.2f} GiB")
    print(f"{'cycle':>5} | {'release s':>9} | {'  weights':>9} | {'       kv':>9} | {'freed GiB':>9} | "
          f"{'freed %':>7} | {'resume s':>8} | {'  weights':>9} | {'       kv':>9}")
    for cycle in range(args.cycles):
        before = free_bytes()
        rel_w = timed(lambda: saver.release(["weights"]))
        rel_kv = timed(lambda: saver.release(["kv_cache"]))
        freed = free_bytes() - before
        res_w = timed(lambda: saver.resume(["weights"]))
        res_kv = timed(lambda: saver.resume(["kv_cache"]))
        assert [a.ptr for tag in ("weights", "kv_cache") for a in saver.region(tag).arenas] == ptrs
        if not args.no_backup:
            assert all(torch.equal(w[:4], c) for w, c in zip(weights, checksum)), "weights changed"
        print(f"{cycle:>5} | {rel_w + rel_kv:>9.3f} | {rel_w:>9.3f} | {rel_kv:>9.3f} | {freed / GIB:>9.2f} | "
              f"{100 * freed / held:>6.1f}% | {res_w + res_kv:>8.3f} | {res_w:>9.3f} | {res_kv:>9.3f}")
    print("addresses unchanged after every resume" + ("" if args.no_backup else "; weights bit-identical"))
    saver.close()


if __name__ == "__main__":
    main()
