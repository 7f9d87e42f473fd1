"""Weight-sync benchmark: push a model shape's random state dict from a trainer to a receiver process.

    python examples/weight_sync_bench.py --shape llama-8b          # NCCL: trainer GPU 0 -> receiver GPU 1
    python examples/weight_sync_bench.py --shape llama-8b --ipc    # CUDA IPC: both on GPU 0
    python examples/weight_sync_bench.py --shape tiny              # CPU: gloo (or shared memory with --ipc)

The receiver is a bare process holding the parameter set an engine of that shape would hold (Hugging
Face names, no model around it); it runs the engine's receive path (``weight_sync.receiver``, or the
opened IPC / shared-memory sources) and copies every tensor into its parameter. Printed next to the
push, measured in the same run over the same pair of devices: a raw ``torch.distributed.broadcast``
of the same bytes in the same bucket sizes (IPC mode: a device-to-device copy of the same bytes),
and the end-to-end time of pause + push + continue as a trainer sees it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from typing import Any

import torch

DTYPE = torch.bfloat16


def hf_param_shapes(shape_name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor names and shapes of a ``rollout.testing.benchmark.MODEL_SHAPES`` entry."""
    from rollout.testing.benchmark import MODEL_SHAPES

    s = MODEL_SHAPES[shape_name]
    h, d, layers = s["hidden_size"], s["head_dim"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    moe = s["arch"] in ("qwen3_moe", "mixtral")
    out = [("model.embed_tokens.weight", (s["vocab_size"], h))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, q)),
                (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        if s["arch"] in ("qwen3", "qwen3_moe"):
            out += [(f"{p}.self_attn.q_norm.weight", (d,)), (f"{p}.self_attn.k_norm.weight", (d,))]
        if moe:
            inter = s["moe_intermediate_size"]
            out.append((f"{p}.mlp.gate.weight", (s["num_experts"], h)))
            for e in range(s["num_experts"]):
                out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, h)),
                        (f"{p}.mlp.experts.{e}.up_proj.weight", (inter, h)),
                        (f"{p}.mlp.experts.{e}.down_proj.weight", (h, inter))]
        else:
            inter = s["intermediate_size"]
            out += [(f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                    (f"{p}.mlp.down_proj.weight", (h, inter))]
    out.append(("model.norm.weight", (h,)))
    if not s.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (s["vocab_size"], h)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- receiver
class _Receiver:
    """The receiving process: parameters, weight groups, and the raw-broadcast baseline."""

    def __init__(self, shape: str, device: str, raw_init: str | None) -> None:
        import torch.distributed as dist

        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.params = {n: torch.empty(s, dtype=DTYPE, device=self.device) for n, s in hf_param_shapes(shape)}
        self.groups: dict[str, Any] = {}
        from weight_sync.buckets import LayoutCache

        self.layouts = LayoutCache()  # as the engine's updater parses them
        if raw_init is not None:  # the default group, for the baseline only; weight_sync never uses it
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=raw_init, rank=1, world_size=2)

    def handle(self, op: str, kw: dict[str, Any]) -> Any:
        from weight_sync.group import CommGroup, GroupConfig
        from weight_sync.receiver import receive_buckets

        if op == "init":
            cfg = GroupConfig(kw["master_address"], kw["master_port"], kw["rank_offset"], kw["world_size"],
                              kw["group_name"], kw["backend"], kw["timeout_s"])
            dev = self.device if cfg.backend == "nccl" else torch.device("cpu")
            self.groups[cfg.group_name] = CommGroup.join(cfg, dev, survive_peer_failure=True)
            return cfg.group_name
        if op == "destroy":
            self.groups.pop(kw["group_name"]).close()
            return None
        if op == "update":
            group = self.groups[kw["group_name"]]
            layouts = self.layouts.get(kw)
            assert group.vote(0) == 0
            for name, t in receive_buckets(group, layouts):
                self.params[name].copy_(t)
            _sync(self.device)
            return kw["version"]
        if op == "update_tensor":
            return self._update_tensor(kw)
        if op == "raw":
            return self._raw(kw["sizes"])
        if op in ("pause", "continue"):
            return None
        raise ValueError(op)

    def _update_tensor(self, kw: dict[str, Any]) -> Any:
        from rollout.control.weight_sources import OpenedSources
        from weight_sync.buckets import bucket_views, layouts_from_args
        from weight_sync.sources import source_from_dict

        layouts = layouts_from_args(kw["names"], kw["dtypes"], kw["shapes"], kw["offsets"], kw["bucket_sizes"])
        sources = [source_from_dict(s) for s in kw["sources"]]
        with OpenedSources(sources, layouts, self.device) as buffers:
            for layout, buf in zip(layouts, buffers):
                for name, t in bucket_views(layout, buf):
                    self.params[name].copy_(t)
        return kw["version"]

    def _raw(self, sizes: list[int]) -> None:
        import torch.distributed as dist

        buf = torch.empty(max(sizes), dtype=torch.uint8, device=self.device)
        for n in sizes:
            dist.broadcast(buf[:n], src=0)
        _sync(self.device)


def _receiver_main(cmds: Any, replies: Any, shape: str, device: str, raw_init: str | None) -> None:
    try:
        receiver = _Receiver(shape, device, raw_init)
    except Exception as e:  # reported to the parent, which stops
        replies.put(("error", f"{type(e).__name__}: {e}"))
        return
    replies.put(("ok", None))
    while True:
        op, kw = cmds.get()
        if op == "stop":
            import torch.distributed as dist

            if dist.is_initialized():  # leaves together with the trainer (NCCL teardown waits for peers)
                dist.destroy_process_group()
            return
        try:
            replies.put(("ok", receiver.handle(op, kw)))
        except Exception as e:
            replies.put(("error", f"{type(e).__name__}: {e}"))


class ReceiverTarget:
    """The trainer's handle on the receiver process: a ``weight_sync.WeightSyncTarget``."""

    def __init__(self, shape: str, device: str, raw_init: str | None) -> None:
        ctx = mp.get_context("spawn")
        self._cmds, self._replies = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_receiver_main, args=(self._cmds, self._replies, shape, device, raw_init),
                                 daemon=True)
        self._proc.start()

    def ready(self) -> None:
        """Wait until the receiver has allocated its parameters (raises if it failed)."""
        self._reply()

    def _reply(self) -> Any:
        status, value = self._replies.get(timeout=900)
        if status != "ok":
            raise RuntimeError(f"receiver: {value}")
        return value

    def call(self, op: str, **kw: Any) -> Any:
        self._cmds.put((op, kw))
        return self._reply()

    def engine_ranks(self) -> int:
        return 1

    def init_weight_update_group(self, **kw: Any) -> Any:
        return self.call("init", **kw)

    def update_weights_from_distributed(self, **kw: Any) -> Any:
        return self.call("update", **kw)

    def update_weights_from_tensor(self, **kw: Any) -> Any:
        return self.call("update_tensor", **kw)

    def destroy_weight_update_group(self, group_name: str) -> Any:
        return self.call("destroy", group_name=group_name)

    def begin_stop(self) -> None:
        self._cmds.put(("stop", {}))

    def stop(self) -> None:
        self.begin_stop()
        self._proc.join(timeout=60)


# ---------------------------------------------------------------------------------------- trainer
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, iters: int, device: torch.device) -> list[float]:
    fn()  # warm-up: communicator set-up, first-use allocations, the engine's layout check
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _line(label: str, times: list[float], nbytes: int, ref: float | None = None) -> str:
    best, med = min(times), statistics.median(times)
    extra = f"  ({ref / best * 100:.1f}% of the baseline)" if ref else ""
    return f"{label:<44} best {best * 1e3:9.2f} ms  median {med * 1e3:9.2f} ms  {nbytes / best / 1e9:8.2f} GB/s{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny", help="a key of rollout.testing.benchmark.MODEL_SHAPES")
    ap.add_argument("--ipc", action="store_true", help="colocated: CUDA IPC on one GPU (shared memory on CPU)")
    ap.add_argument("--bucket-mb", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    import weight_sync

    cuda = torch.cuda.is_available()
    if not args.ipc and cuda and torch.cuda.device_count() < 2:
        raise SystemExit("a distributed push needs 2 GPUs (use --ipc on one)")
    trainer_dev = torch.device("cuda:0" if cuda else "cpu")
    receiver_dev = "cuda:1" if cuda and not args.ipc else ("cuda:0" if cuda else "cpu")
    backend = "nccl" if cuda else "gloo"
    bucket = args.bucket_mb << 20

    shapes = hf_param_shapes(args.shape)
    gen = torch.Generator(device=trainer_dev).manual_seed(0)
    state = [(n, torch.randn(s, generator=gen, device=trainer_dev, dtype=torch.float32).to(DTYPE))
             if trainer_dev.type == "cpu" else (n, torch.randn(s, generator=gen, device=trainer_dev, dtype=DTYPE))
             for n, s in shapes]
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    raw_init = None if args.ipc else f"tcp://127.0.0.1:{_free_port()}"
    receiver = ReceiverTarget(args.shape, receiver_dev, raw_init)
    if raw_init is not None:
        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(trainer_dev)
        dist.init_process_group(backend, init_method=raw_init, rank=0, world_size=2)
    receiver.ready()
    from weight_sync.buckets import plan_buckets

    layouts = plan_buckets(((n, t.dtype, t.shape) for n, t in state), bucket)
    print(f"shape {args.shape}: {len(state)} tensors, {nbytes / 1e9:.2f} GB {str(DTYPE)[6:]}, "
          f"{len(layouts)} buckets of <= {args.bucket_mb} MiB; trainer {trainer_dev}, receiver {receiver_dev}")
    version = iter(range(1, 1 << 30))
    if args.ipc:
        push = weight_sync.push_tensors_ipc if cuda else weight_sync.push_tensors_shm
        dst = torch.empty(max(lay.nbytes for lay in layouts), dtype=torch.uint8, device=trainer_dev)

        def copy_same_bytes() -> None:
            for _, t in state:
                dst[:t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))

        base = _timed(copy_same_bytes, args.iters, trainer_dev)
        label = "device-to-device copy of the same bytes" if cuda else "memcpy of the same bytes"
        print(_line(label, base, nbytes))
        if cuda:
            for in_place in (True, False):
                t_push = _timed(lambda in_place=in_place: push([receiver], state, version=next(version),
                                                               bucket_bytes=bucket, in_place=in_place),
                                args.iters, trainer_dev)
                how = "tensors shared in place" if in_place else f"packed into {len(layouts)} buckets"
                print(_line(f"colocated update, CUDA IPC, {how}", t_push, nbytes))
        else:
            t_push = _timed(lambda: push([receiver], state, version=next(version), bucket_bytes=bucket), args.iters,
                            trainer_dev)
            print(_line("colocated update, shared memory", t_push, nbytes))
    else:
        import torch.distributed as dist

        sizes = [lay.nbytes for lay in layouts]
        src = torch.empty(max(sizes), dtype=torch.uint8, device=trainer_dev)

        def raw() -> None:
            receiver._cmds.put(("raw", {"sizes": sizes}))
            for n in sizes:
                dist.broadcast(src[:n], src=0)
            receiver._reply()

        base = _timed(raw, args.iters, trainer_dev)
        print(_line("raw torch.distributed.broadcast, same buckets", base, nbytes))
        group = weight_sync.connect([receiver], backend=backend, bucket_bytes=bucket, timeout_s=600,
                                    device=trainer_dev)
        t_push = _timed(lambda: group.push(state, version=next(version)), args.iters, trainer_dev)
        print(_line("weight_sync push", t_push, nbytes, min(base)))

        def end_to_end() -> None:
            receiver.call("pause")
            group.push(state, version=next(version))
            receiver.call("continue")

        print(_line("end to end: pause + push + continue", _timed(end_to_end, args.iters, trainer_dev), nbytes,
                    min(base)))
        group.close()
        receiver.begin_stop()  # both sides tear the default group down at the same time
        dist.destroy_process_group()
    receiver.stop()


if __name__ == "__main__":
    main()
