"""Host time of handing one decode step's tokens to asyncio streams: the front end alone, on CPU.

    python examples/profile_stream_delivery.py                  # batch 64 and 256
    python examples/profile_stream_delivery.py --batch 256 --no-text --cprofile 20

The in-process ``Engine`` (the path of ``examples/offline_throughput.py``) runs its loop in a
thread that shares the GIL with the streams' consumers, so the Python each token costs in the
front end adds to the host time of a step, next to the loop's own (``profile_host_step.py``).
This times that part alone:

- an ``EngineClient`` whose engine loop is a stand-in (``rollout.testing.stand_in_loop``): each
  step it answers with one single-token ``StreamChunk`` per stream, routed by the client's router
  thread as the loop's events are;
- ``--batch`` asyncio tasks consume ``EngineClient.astream`` as ``Engine.async_stream`` does
  (``TextDeltas`` with the embedded model's tokenizer, unless ``--no-text``) and as the
  benchmark's consumer does (a timestamp per chunk);
- the steps go one at a time, each once every stream has taken the one before, so a step's time is
  the whole hand-over: router, wake-ups, consumers. The fastest of ``--repeats`` runs is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import threading
import time

from rollout.detokenize import TextDeltas
from rollout.engine.messages import AddRequest
from rollout.testing.stand_in_loop import StandInLoop
from rollout.types import SamplingParams, StreamChunk


async def _run(batch: int, steps: int, tokenizer, vocab: int) -> float:
    """Seconds per step of ``steps`` steps of ``batch`` streams (after a few unmeasured ones)."""
    engine = StandInLoop(record=False)
    client = engine.client()
    loop = asyncio.get_running_loop()
    step_done = threading.Event()
    taken = [0]

    def took() -> None:
        taken[0] += 1
        if taken[0] == batch:
            taken[0] = 0
            step_done.set()

    async def consume(rid: str) -> None:
        deltas = TextDeltas(tokenizer) if tokenizer is not None else None
        times = []
        req = AddRequest(rid, [1], SamplingParams(max_new_tokens=steps), stream=True)
        async for chunk in client.astream(req):
            if deltas is not None:
                deltas.add(chunk)
            times.append(time.perf_counter())
            took()

    rng = random.Random(0)
    ids = [f"r{i}" for i in range(batch)]
    warm = min(10, steps // 2)
    marks: list[float] = []

    def produce() -> None:
        for k in range(steps):
            last = k == steps - 1
            engine.inbox.put([StreamChunk(rid, 0, [rng.randrange(vocab)], finished=last) for rid in ids])
            step_done.wait()
            step_done.clear()
            if k == warm - 1 or last:
                marks.append(time.perf_counter())

    tasks = [asyncio.create_task(consume(rid)) for rid in ids]
    await asyncio.sleep(0.05)  # every stream submitted before the first step
    producer = loop.run_in_executor(None, produce)
    await asyncio.gather(*tasks)
    await producer
    client.shutdown()
    return (marks[1] - marks[0]) / (steps - warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,256", help="comma-separated stream counts")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-text", action="store_true", help="consumers skip the text deltas")
    ap.add_argument("--cprofile", type=int, default=0, help="list the top N functions of the consuming thread")
    args = ap.parse_args()
    tokenizer = None
    vocab = 512
    if not args.no_text:
        from rollout.default_model import default_model_path
        from rollout.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_model_dir(default_model_path())
        vocab = tokenizer.vocab_size
    print(f"front end us per step: {args.steps} steps, one token per stream, best of {args.repeats}, "
          f"text {'off' if args.no_text else 'on'}")
    for batch in (int(b) for b in args.batch.split(",") if b):
        prof = cProfile.Profile() if args.cprofile else None
        best = float("inf")
        for _ in range(args.repeats):
            if prof is not None:
                prof.enable()
            best = min(best, asyncio.run(_run(batch, args.steps, tokenizer, vocab)))
            if prof is not None:
                prof.disable()
        print(f"batch {batch:>5}: {best * 1e6:9.1f} us per step, {best * 1e6 / batch:6.2f} us per token")
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
