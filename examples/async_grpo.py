"""Asynchronous GRPO on a verifiable toy task, with the rollout server as the generator.

    PYTHONPATH=. python examples/async_grpo.py                     # CPU, about a minute and a half
    PYTHONPATH=. python examples/async_grpo.py --device cuda       # trainer and server on GPUs

Task: single-digit addition (operands 0..--max-digit); a checker gives reward 1 for the sum then
end-of-text, else 0. The policy is a small random Qwen3-shaped model (the project's random model
writer); the trainer is ``transformers.Qwen3ForCausalLM`` loaded from the same directory (float32).
A few supervised steps on solved problems make some first rewards non-zero; GRPO does the rest.

    rollout thread (asyncio, gRPC)               trainer (main thread)
    groups of n samples, each with its    --->   P groups: drop samples with a token more than K
    per-token logprobs and weight versions       versions old; group-normalised advantages; clipped
                                                 ratio loss times truncated IS weights; one Adam step;
                                                 pause(in_place) -> push (version + 1) -> continue

Groups are asked for --ahead steps early, so generation never waits for the trainer. A push
pauses the server in place: samples in flight keep their KV and finish under the new weights (their
per-token versions show it). Each token's behaviour policy is the trainer's snapshot of the weights
that sampled it; the truncated IS weight min(pi_snapshot / pi_rollout, C) corrects what the
engine's numbers differ by: rounding (tiny in float32), and the tokens of a partial rollout that the
engine computed over KV written by the previous weights.

Writes metrics.json and async_grpo.png (mean reward, mean |rollout - trainer| logprob gap) to --out-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Coroutine

import torch
from tokenizers import Tokenizer

import weight_sync
from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.testing.random_model import write_random_model
from rollout.types import FinishReason, PauseMode


@dataclass(slots=True)
class Sample:
    """One sampled answer and what the engine reported for it."""

    prompt_ids: list[int]
    output_ids: list[int]
    rollout_logprobs: list[float]
    versions: list[int]  # weight version of each output token
    reward: float


@dataclass(slots=True)
class StepStats:
    """What one optimiser step saw and did."""

    step: int
    reward: float  # mean over the step's samples
    gap_behaviour: float  # mean |rollout logprob - trainer logprob under the weights that sampled the token|
    gap_current: float  # mean |rollout logprob - trainer logprob under the weights being updated|
    dropped_stale: int
    partial: int  # samples that span a weight push
    tis_clipped: float  # fraction of tokens whose IS weight hit the cap
    seconds: float


class AdditionTask:
    """Prompts "a+b=" and the checker of their answers."""

    def __init__(self, tokenizer: Tokenizer, max_digit: int) -> None:
        self.tok, self.max_digit = tokenizer, max_digit
        self.eos_id = tokenizer.token_to_id("<|endoftext|>")

    def problem(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(0, self.max_digit), rng.randint(0, self.max_digit)

    def prompt(self, a: int, b: int) -> list[int]:
        return self.tok.encode(f"{a}+{b}=").ids

    def answer(self, a: int, b: int) -> list[int]:
        return self.tok.encode(str(a + b)).ids + [self.eos_id]

    def reward(self, a: int, b: int, output_ids: list[int], finish: FinishReason) -> float:
        """1 for the exact sum followed by end-of-text, else 0."""
        if finish != FinishReason.STOP or not output_ids or output_ids[-1] != self.eos_id:
            return 0.0
        return float(self.tok.decode(output_ids[:-1]).strip() == str(a + b))


class RolloutWorker:
    """An asyncio loop in its own thread that generates GRPO groups on request."""

    def __init__(self, address: str, task: AdditionTask, args: argparse.Namespace, out: queue.Queue) -> None:
        self.task, self.args, self.out = task, args, out
        self.rng = random.Random(args.seed + 1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rollouts", daemon=True)
        self.thread.start()
        self.client = self._run(self._connect(address)).result()  # its channel belongs to this loop
        self.pending: set[concurrent.futures.Future] = set()

    def _run(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @staticmethod
    async def _connect(address: str) -> AsyncRolloutClient:
        return AsyncRolloutClient(address)

    def request(self, groups: int) -> None:
        """Start ``groups`` more groups; each lands in ``out`` (a list of samples) when all its samples end."""
        for _ in range(groups):
            a, b = self.task.problem(self.rng)
            fut = self._run(self._group(a, b, self.rng.randrange(1 << 30)))
            self.pending.add(fut)
            fut.add_done_callback(self.pending.discard)

    async def _group(self, a: int, b: int, seed: int) -> None:
        prompt = self.task.prompt(a, b)
        sampling = {"n": self.args.group_size, "temperature": 1.0, "max_new_tokens": 4, "seed": seed}
        try:
            outs = await self.client.generate(input_ids=prompt, sampling_params=sampling, return_logprob=True)
        except Exception as e:  # handed to the trainer, which stops
            self.out.put(e)
            return
        self.out.put([Sample(prompt, o.output_ids, o.output_logprobs, o.weight_versions,
                             self.task.reward(a, b, o.output_ids, o.finish_reason)) for o in outs])

    def close(self) -> None:
        for fut in list(self.pending):
            fut.cancel()  # a cancelled call aborts its request on the server
        self._run(self.client.close()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def token_logprobs(model: torch.nn.Module, samples: list[Sample], device: torch.device) -> torch.Tensor:
    """Log-probabilities of each sample's output tokens under ``model``: (B, T_out), 0 where padded."""
    seqs = [s.prompt_ids + s.output_ids for s in samples]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = torch.tensor(q)
        mask[i, : len(q)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, W, V)
    # Position j predicts token j + 1.
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, W-1)
    out = torch.zeros(len(samples), max(len(s.output_ids) for s in samples), device=device)
    for i, s in enumerate(samples):
        p = len(s.prompt_ids)
        out[i, : len(s.output_ids)] = lp[i, p - 1 : p - 1 + len(s.output_ids)]
    return out


def padded(rows: list[list[float]], fill: float, device: torch.device) -> torch.Tensor:
    """Rows of unequal length as one (B, T) tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.float32, device=device)


class Trainer:
    """The policy, its optimiser, and the weights of the last K + 1 versions (the behaviour policies)."""

    def __init__(self, model_dir: str, args: argparse.Namespace) -> None:
        from transformers import Qwen3ForCausalLM

        self.args = args
        self.device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
        self.model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.behaviour = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.warmup_lr)
        self.version = 0
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def warm_up(self, task: AdditionTask, rng: random.Random) -> None:
        """A few supervised steps on solved problems, so that some samples of the first groups are right."""
        for _ in range(self.args.warmup_steps):
            batch = [Sample(task.prompt(a, b), task.answer(a, b), [], [], 0.0)
                     for a, b in (task.problem(rng) for _ in range(64))]
            mask = padded([[1.0] * len(s.output_ids) for s in batch], 0.0, self.device)
            loss = -(token_logprobs(self.model, batch, self.device) * mask).sum() / mask.sum()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        for group in self.opt.param_groups:
            group["lr"] = self.args.lr

    def new_version(self) -> int:
        """Number the current weights and keep them while tokens they sample may still be trained on."""
        self.version += 1
        self.snapshots[self.version] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for v in [v for v in self.snapshots if v < self.version - self.args.max_staleness]:
            del self.snapshots[v]
        return self.version

    def step(self, groups: list[list[Sample]], step: int, t0: float) -> StepStats | None:
        """One optimiser step on these groups; None when no group carried a learning signal."""
        args, dev = self.args, self.device
        every = [s for g in groups for s in g]
        fresh = [[s for s in g if s.versions and min(s.versions) >= self.version - args.max_staleness] for g in groups]
        samples, advantages = [], []
        for g in fresh:
            r = torch.tensor([s.reward for s in g])
            if len(g) > 1 and r.std() > 0:  # a group whose samples all score alike teaches nothing
                samples += g
                advantages += ((r - r.mean()) / (r.std() + 1e-4)).tolist()
        if not samples:
            return None
        mask = padded([[1.0] * len(s.output_ids) for s in samples], 0.0, dev)
        rollout_lp = padded([s.rollout_logprobs for s in samples], 0.0, dev)
        versions = padded([[float(v) for v in s.versions] for s in samples], -1.0, dev)
        lp = token_logprobs(self.model, samples, dev)
        behaviour = lp.detach().clone()  # tokens of the current version: the snapshot is the model itself
        with torch.no_grad():
            for v in sorted({v for s in samples for v in s.versions if v != self.version}):
                self.behaviour.load_state_dict(self.snapshots[v])
                sel = versions == v
                behaviour[sel] = token_logprobs(self.behaviour, samples, dev)[sel]
        tis = torch.exp(behaviour - rollout_lp).clamp(max=args.is_cap)  # truncated importance weight
        ratio = torch.exp(lp - behaviour)  # 1 for the current version's tokens; clipped for older ones
        adv = torch.tensor(advantages, device=dev)[:, None]
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv)
        loss = -(tis * surrogate * mask).sum() / mask.sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        n = mask.sum()
        return StepStats(
            step=step, reward=sum(s.reward for s in every) / len(every),
            gap_behaviour=float(((behaviour - rollout_lp).abs() * mask).sum() / n),
            gap_current=float(((lp.detach() - rollout_lp).abs() * mask).sum() / n),
            dropped_stale=len(every) - sum(map(len, fresh)),
            partial=sum(len(set(s.versions)) > 1 for s in every),
            tis_clipped=float(((tis >= args.is_cap) * mask).sum() / n), seconds=time.monotonic() - t0)


def start_server(model_dir: str, device: str, log_path: str) -> tuple[subprocess.Popen, str]:
    """``rollout serve`` on a free port; returns the process and its address once it serves."""
    # One CPU thread each for the engine and the trainer: two processes whose thread pools spin on the
    # same few cores run many times slower than one thread each.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if device == "cpu" else None
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rollout", "serve", "--model", model_dir, "--port", "0",
                                 "--device", device, "--dtype", "float32", "--max-total-tokens", "16384"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        with open(log_path) as f:
            m = re.search(r"listening on (\S+:\d+)", f.read())
        if m:
            with RolloutClient(m.group(1)) as c:
                c.wait_ready(max(1.0, deadline - time.monotonic()))
            return proc, m.group(1)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the rollout server did not start; its log is {log_path}")


class Pusher:
    """New weights to the server: a gloo / NCCL group, or CUDA IPC when the server shares the trainer's GPU."""

    def __init__(self, client: RolloutClient, backend: str) -> None:
        self.client = client
        self.group = None if backend == "ipc" else weight_sync.connect(
            [client], backend=backend, master_address="127.0.0.1", timeout_s=120)

    def push(self, model: torch.nn.Module, version: int) -> None:
        self.client.pause(PauseMode.IN_PLACE)  # samples in flight keep their KV and go on under the new weights
        try:
            if self.group is None:
                weight_sync.push_tensors_ipc([self.client], model.named_parameters(), version=version)
            else:
                self.group.push(model.named_parameters(), version=version)
        finally:
            self.client.continue_()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


def plot(history: list[StepStats], path: str) -> None:
    """Mean reward and mean logprob gaps per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h.step for h in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [h.reward for h in history], marker=".", linewidth=0.8)
    top.set(ylabel="mean reward", title="async GRPO, single-digit addition")
    bottom.plot(steps, [max(h.gap_behaviour, 1e-9) for h in history], label="vs the weights that sampled it")
    bottom.plot(steps, [max(h.gap_current, 1e-9) for h in history], label="vs the weights being trained")
    bottom.set(yscale="log", ylabel="mean |rollout - trainer| logprob", xlabel="optimiser step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked."""
    p = argparse.ArgumentParser(description="Asynchronous GRPO on single-digit addition over the rollout server")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps")
    p.add_argument("--group-size", type=int, default=16, help="samples per prompt (GRPO group)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="groups per optimiser step")
    p.add_argument("--ahead", type=int, default=1, help="steps whose groups are generated in advance")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=25, help="supervised steps before GRPO")
    p.add_argument("--warmup-lr", type=float, default=2e-3)
    p.add_argument("--max-staleness", type=int, default=2, help="K: drop samples with a token > K versions old")
    p.add_argument("--is-cap", type=float, default=2.0, help="C: cap of the truncated IS weight")
    p.add_argument("--clip", type=float, default=0.2, help="ratio clip for tokens of older versions")
    p.add_argument("--max-digit", type=int, default=4, help="operands are 0..max-digit (at most 9)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="async_grpo_out")
    args = p.parse_args(argv)
    small = [n for n in ("steps", "group_size", "prompts_per_step", "hidden_size", "layers") if getattr(args, n) < 1]
    if small or not 0 <= args.max_digit <= 9 or args.ahead < 0 or args.max_staleness < 0 or args.is_cap <= 0:
        p.error("need counts >= 1, 0 <= --max-digit <= 9, --ahead >= 0, --max-staleness >= 0, --is-cap > 0")
    return args


def main(argv: list[str] | None = None) -> list[StepStats]:
    """Train; returns the stats of every optimiser step."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(1)
    rng = random.Random(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    model_dir = write_random_model(tempfile.mkdtemp(prefix="grpo-model-"), "qwen3", seed=args.seed,
                                   hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                                   num_hidden_layers=args.layers, head_dim=32, init_std=0.02)
    # On GPUs the server takes a second GPU when there is one (NCCL), else shares the trainer's (CUDA IPC).
    gpus = min(torch.cuda.device_count(), 2) if args.device == "cuda" else 0
    server_device, backend = {0: ("cpu", "gloo"), 1: ("cuda:0", "ipc"), 2: ("cuda:1", "nccl")}[gpus]
    server, address = start_server(model_dir, server_device, os.path.join(args.out_dir, "server.log"))
    task = AdditionTask(Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")), args.max_digit)
    client = RolloutClient(address, timeout=120)
    groups: queue.Queue = queue.Queue()
    worker = pusher = None
    history: list[StepStats] = []
    try:
        trainer = Trainer(model_dir, args)
        trainer.warm_up(task, rng)
        pusher = Pusher(client, backend)
        pusher.push(trainer.model, trainer.new_version())
        worker = RolloutWorker(address, task, args, groups)
        worker.request((args.ahead + 1) * args.prompts_per_step)
        t0 = time.monotonic()
        for step in range(1, args.steps + 1):
            batch = [groups.get(timeout=300) for _ in range(args.prompts_per_step)]
            if failed := [g for g in batch if isinstance(g, Exception)]:
                raise failed[0]
            worker.request(args.prompts_per_step)
            stats = trainer.step(batch, step, t0)
            if stats is None:
                continue  # nothing to learn from: no step, no push
            pusher.push(trainer.model, trainer.new_version())
            history.append(stats)
            print(f"step {step:4d}  reward {stats.reward:.3f}  gap {stats.gap_behaviour:.1e} "
                  f"(vs trained weights {stats.gap_current:.1e})  stale {stats.dropped_stale:3d}  "
                  f"partial {stats.partial:3d}  {stats.seconds:5.1f} s", flush=True)
    finally:
        if worker is not None:
            worker.close()
        if pusher is not None:
            pusher.close()
        client.close()
        server.terminate()
        server.wait(30)
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump([asdict(h) for h in history], f, indent=1)
    plot(history, os.path.join(args.out_dir, "async_grpo.png"))
    k = max(1, len(history) // 10)
    first, last = (sum(h.reward for h in part) / max(1, len(part)) for part in (history[:k], history[-k:]))
    print(f"mean reward: first {k} steps {first:.3f}, last {k} steps {last:.3f}; plot in {args.out_dir}")
    return history


if __name__ == "__main__":
    main()
