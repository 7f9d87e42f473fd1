"""Quickstart: talk to a running rollout server.

    rollout serve &                      # the embedded tiny model (random weights) on 127.0.0.1:50051
    python examples/quickstart.py        # or: python examples/quickstart.py HOST:PORT [--token T]

It samples a GRPO-style group (one prompt, n = 8) with logprobs, then pauses a long generation in
place, shows the engine state, and continues it to the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from rollout.client import RolloutClient
from rollout.types import PauseMode, SamplingParams

PROMPT = "Question: what is 12 plus 30? Answer:"


def show_info(client: RolloutClient, title: str) -> None:
    info = client.get_info()
    print(f"--- {title}")
    print(
        f"    model {info.architecture} at {info.model_path} ({info.device}, {info.dtype}), "
        f"context {info.context_length}, weight version {info.weight_version}"
    )
    mode = f" ({info.pause_mode})" if info.paused else ""
    print(
        f"    paused: {info.paused}{mode}; waiting {info.num_waiting}, running {info.num_running}, "
        f"frozen in place {info.num_paused}"
    )
    print(
        f"    KV tokens: {info.kv_used_tokens} used by requests, {info.kv_cached_tokens} cached, "
        f"{info.kv_total_tokens} total"
    )


def grpo_group(client: RolloutClient) -> None:
    print(f"\n=== GRPO group: n = 8 samples of {PROMPT!r}")
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=32, seed=0)
    t0 = time.perf_counter()
    outputs = client.generate(PROMPT, params, return_logprob=True)
    elapsed = time.perf_counter() - t0
    print(f"{'#':>2} {'tokens':>6} {'mean logprob':>12} {'cached':>6} {'finish':>6}  text")
    for out in outputs:
        mean_lp = statistics.fmean(out.output_logprobs) if out.output_logprobs else float("nan")
        text = (out.text or "").replace("\n", "\\n")
        print(
            f"{out.index:>2} {len(out.output_ids):>6} {mean_lp:>12.3f} {out.cached_tokens:>6} "
            f"{out.finish_reason.value:>6}  {text[:60]!r}"
        )
    shared = sum(o.cached_tokens > 0 for o in outputs)
    print(
        f"{len(outputs)} samples in {elapsed:.2f} s; {shared} of them reused the prompt's KV "
        f"({outputs[0].prompt_tokens} prompt tokens)"
    )


def pause_and_continue(client: RolloutClient) -> None:
    print("\n=== Pause a long generation in place, then continue it")
    params = SamplingParams(temperature=0.0, max_new_tokens=256, ignore_eos=True)
    received: list[int] = []
    finals = []
    first = threading.Event()

    def consume() -> None:
        for chunk in client.stream(PROMPT, params):
            received.extend(chunk.token_ids)
            first.set()
            if chunk.finished:
                finals.append(chunk)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    if not first.wait(60):
        raise RuntimeError("no token within 60 s")
    client.pause(PauseMode.IN_PLACE)
    at_pause = len(received)
    print(f"paused after {at_pause} tokens")
    show_info(client, "while paused")
    time.sleep(0.5)
    print(f"0.5 s later: {len(received)} tokens (frozen, KV kept)")
    client.continue_()
    reader.join(120)
    if not finals:
        raise RuntimeError("the paused generation did not finish after continue")
    last = finals[0]
    print(f"continued: finished with {last.completion_tokens} tokens, reason {last.finish_reason.value}")
    show_info(client, "after continue")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--token", default=None, help="auth token, if the server was started with one")
    parser.add_argument("--tls-ca", default=None, help="CA certificate, if the server serves TLS")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the server")
    args = parser.parse_args()
    with RolloutClient(args.address, token=args.token, tls_ca=args.tls_ca, timeout=120) as client:
        print(f"waiting for {args.address} to be SERVING ...")
        client.wait_ready(args.wait)
        show_info(client, "GetInfo")
        grpo_group(client)
        pause_and_continue(client)
    print("\nquickstart done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
