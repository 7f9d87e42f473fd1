"""The RL rollout step as a benchmark workload: GRPO groups with a shared system prefix and a long tail.

``N`` prompts, each ``system prefix (shared by all) + its own part``, and ``n`` samples of each prompt.
Every sample gets a target output length drawn once from a fixed seed: log-normal (most samples
short), capped at ``max_new_tokens``, with at least one sample at the cap, so that the step ends
with a small tail batch decoding alone, as a real step does when a few responses run to the limit.

Random weights cannot be made to emit an end-of-sequence token on cue, so each sample is its own
request with ``max_new_tokens`` set to its drawn length and ``ignore_eos``: it leaves the batch at
exactly that step, and its KV is freed as for a stop. Samples of one prompt are separate requests
with identical prompt ids; the scheduler groups them by prompt exactly as it groups the ``n``
samples of one request (it holds siblings back while one computes the prompt, then they share it
through the prefix cache), and this way each sample can have a length of its own.

``run_rollout`` streams every sample through the in-process ``Engine`` and records when each chunk
arrived; ``summarize_rollout`` turns the records into the harness figures (ANCHORS.md) plus the
rollout ones: makespan, time in the tail, prefix-cache hit rate.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rollout.errors import InvalidArgumentError
from rollout.types import FinishReason, SamplingParams

TAIL_FRACTION = 0.1  # "the tail": the last 10% of samples to finish


@dataclass(frozen=True)
class RolloutWorkload:
    """The prompts, and the output length of every sample of every prompt (prompt-major)."""

    prefix_len: int  # tokens of the system prefix every prompt starts with
    prompts: list[list[int]]  # (N,) prefix + own part
    samples: int  # n: samples per prompt (a GRPO group)
    output_lens: list[list[int]]  # (N, n) drawn output length of each sample
    max_new_tokens: int
    seed: int

    @classmethod
    def build(cls, *, num_prompts: int, samples: int, prefix_len: int, prompt_len: int, max_new_tokens: int,
              median_new_tokens: float, sigma: float, vocab: int, seed: int = 0) -> RolloutWorkload:
        """Random prompt ids and log-normal output lengths, all from ``seed``.

        ``prompt_len`` is each prompt's own part, after the shared prefix. Lengths are
        ``round(lognormal(log(median), sigma))`` clamped to ``[1, max_new_tokens]``; the longest
        draw is then set to ``max_new_tokens`` so the step always has a sample at the cap.
        """
        for name, value, low in (("num_prompts", num_prompts, 1), ("samples", samples, 1),
                                 ("prefix_len", prefix_len, 0), ("prompt_len", prompt_len, 1),
                                 ("max_new_tokens", max_new_tokens, 1), ("vocab", vocab, 1)):
            if value < low:
                raise InvalidArgumentError(f"must be >= {low} (got {value})", field=name)
        if not median_new_tokens >= 1 or not sigma >= 0:
            raise InvalidArgumentError("median must be >= 1 and sigma >= 0", field="median_new_tokens/sigma")
        rng = random.Random(seed)
        prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
        prompts = [prefix + [rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(num_prompts)]
        mu = math.log(median_new_tokens)
        flat = [min(max_new_tokens, max(1, round(rng.lognormvariate(mu, sigma))))
                for _ in range(num_prompts * samples)]
        flat[max(range(len(flat)), key=flat.__getitem__)] = max_new_tokens
        lens = [flat[i * samples:(i + 1) * samples] for i in range(num_prompts)]
        return cls(prefix_len, prompts, samples, lens, max_new_tokens, seed)

    @property
    def num_samples(self) -> int:
        return len(self.prompts) * self.samples

    @property
    def total_output_tokens(self) -> int:
        return sum(sum(row) for row in self.output_lens)

    def best_cached_tokens(self, page_size: int = 1) -> int:
        """Prompt tokens that a perfect prefix cache would serve from cache, over all samples.

        The first sample computes its whole prompt; each later prompt reuses the shared prefix;
        each later sample of a prompt reuses all of it but the last token (a step must compute at
        least one token to produce logits). Matches are whole pages.
        """
        def pages(n: int) -> int:
            return n // page_size * page_size

        total = 0
        for i, prompt in enumerate(self.prompts):
            total += pages(self.prefix_len) if i > 0 else 0  # first sample of prompt i
            total += (self.samples - 1) * pages(len(prompt) - 1)
        return total

    def requests(self, temperature: float = 1.0) -> list[tuple[str, list[int], SamplingParams]]:
        """(request id, prompt ids, params) of every sample, prompt-major; sample ``j`` of prompt ``i``
        is ``p{i}-s{j}``, with a seed of its own."""
        out = []
        for i, prompt in enumerate(self.prompts):
            for j, n in enumerate(self.output_lens[i]):
                seed = self.seed * 1_000_003 + i * self.samples + j
                out.append((f"p{i}-s{j}", prompt, SamplingParams(
                    temperature=temperature, max_new_tokens=n, ignore_eos=True, seed=seed)))
        return out


@dataclass
class SampleRecord:
    """What one sample's stream delivered, with the arrival time of each chunk (perf_counter)."""

    request_id: str
    target_len: int
    prompt_tokens: int
    start: float
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ok(self) -> bool:
        """Finished by length at its drawn length, with one finite logprob per token."""
        return (self.error is None and self.finish_reason is FinishReason.LENGTH
                and self.output_tokens == self.completion_tokens == self.target_len
                and len(self.logprobs) == self.target_len and all(math.isfinite(x) for x in self.logprobs))

    def itls(self) -> list[float]:
        """Inter-token latencies (s): each chunk's gap spread over the tokens it carried."""
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            n = max(self.chunk_tokens[i], 1)
            out.extend([(self.chunk_times[i] - self.chunk_times[i - 1]) / n] * n)
        return out


async def run_rollout(engine: Any, workload: RolloutWorkload, temperature: float = 1.0,
                      id_prefix: str = "") -> tuple[list[SampleRecord], float]:
    """Submit every sample at once and stream them all; returns the records and the start time."""
    t0 = time.perf_counter()

    async def one(rid: str, prompt: list[int], sp: SamplingParams) -> SampleRecord:
        rec = SampleRecord(rid, sp.max_new_tokens, len(prompt), t0)
        try:
            async for chunk in engine.async_stream(prompt, sp, return_logprob=True, request_id=id_prefix + rid):
                now = time.perf_counter()
                if chunk.token_ids:
                    rec.chunk_times.append(now)
                    rec.chunk_tokens.append(len(chunk.token_ids))
                    rec.logprobs.extend(chunk.logprobs or [])
                if chunk.finished:
                    rec.finish_time = now
                    rec.finish_reason = chunk.finish_reason
                    rec.completion_tokens = chunk.completion_tokens
                    rec.cached_tokens = chunk.cached_tokens
        except Exception as e:  # counted as a failed sample, not fatal to the benchmark
            rec.error = f"{type(e).__name__}: {e}"
        return rec

    records = await asyncio.gather(*(one(*r) for r in workload.requests(temperature)))
    return list(records), t0


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank on the sorted values); NaN for no values."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize_rollout(records: list[SampleRecord], t0: float, workload: RolloutWorkload,
                      page_size: int = 1) -> dict[str, float]:
    """Harness figures plus makespan, tail and prefix-cache figures of one rollout step.

    The makespan runs from submission to the last sample's end. The tail starts when all but the
    last ``ceil(TAIL_FRACTION * samples)`` samples have finished; ``tail_tokens`` are the tokens
    that arrived after that point. Throughputs divide by the makespan.
    """
    ok = [r for r in records if r.ok]
    ends = sorted(r.finish_time - t0 for r in records if r.finish_time is not None)
    makespan = ends[-1] if ends else float("nan")
    tail_n = max(1, math.ceil(TAIL_FRACTION * len(records)))
    tail_start = ends[-tail_n - 1] if len(ends) > tail_n else 0.0
    tail_tokens = sum(n for r in records for t, n in zip(r.chunk_times, r.chunk_tokens) if t - t0 > tail_start)
    inp = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    cached = sum(r.cached_tokens for r in records)
    prompt_total = sum(r.prompt_tokens for r in records)
    ttfts = [(r.chunk_times[0] - r.start) * 1e3 for r in ok if r.chunk_times]
    itls = [x * 1e3 for r in ok for x in r.itls()]
    figures: dict[str, float] = {
        "samples": len(records),
        "successful_requests": len(ok),
        "duration_s": makespan,
        "makespan_s": makespan,
        "total_input_tokens": inp,
        "total_output_tokens": out,
        "request_throughput": len(ok) / makespan,
        "input_throughput": inp / makespan,
        "output_throughput": out / makespan,
        "total_throughput": (inp + out) / makespan,
        "tail_samples": tail_n,
        "tail_s": makespan - tail_start,
        "tail_share": (makespan - tail_start) / makespan,
        "tail_tokens": tail_tokens,
        "cached_tokens": cached,
        "prefix_hit_rate": cached / prompt_total if prompt_total else 0.0,
        "best_hit_rate": workload.best_cached_tokens(page_size) / prompt_total if prompt_total else 0.0,
        "mean_ttft_ms": statistics.fmean(ttfts) if ttfts else float("nan"),
        "mean_itl_ms": statistics.fmean(itls) if itls else float("nan"),
    }
    for q in (50, 90, 99):
        figures[f"p{q}_ttft_ms"] = percentile(ttfts, q)
        figures[f"p{q}_itl_ms"] = percentile(itls, q)
    return figures
