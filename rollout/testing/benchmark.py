"""Benchmark workloads and reporting in the format of SGLang's and vLLM's serving harnesses.

Shared by ``examples/offline_throughput.py`` (in-process) and the gRPC benchmark: a workload of
random prompts, per-request timing records, and one printer so every figure compares.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from rollout.types import SamplingParams, StreamChunk

# Real model shapes for benchmarks with random weights (dicts of write_random_model options).
MODEL_SHAPES: dict[str, dict] = {
    "tiny": dict(arch="qwen3", vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096),
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, tie_word_embeddings=True),
    "llama-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=131072),
    "qwen3-30b-a3b": dict(arch="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          max_position_embeddings=40960),
}


@dataclass(frozen=True)
class Workload:
    """Random-token prompts with per-request output lengths (nano-vllm's bench.py shape)."""

    prompts: list[list[int]]
    output_lens: list[int]

    @classmethod
    def random(cls, num: int, min_in: int, max_in: int, min_out: int, max_out: int, vocab: int,
               seed: int = 0) -> Workload:
        rng = random.Random(seed)
        prompts = [[rng.randrange(0, vocab) for _ in range(rng.randint(min_in, max_in))] for _ in range(num)]
        outs = [rng.randint(min_out, max_out) for _ in range(num)]
        return cls(prompts, outs)

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def sampling_params(self, temperature: float, seed: int = 0) -> list[SamplingParams]:
        """One SamplingParams per request: its output length, ignore_eos, a seed of its own."""
        return [SamplingParams(temperature=temperature, max_new_tokens=n, ignore_eos=True, seed=seed + i)
                for i, n in enumerate(self.output_lens)]


@dataclass
class RequestRecord:
    """Timing of one request: send time, then the arrival time of each chunk and its token count."""

    start: float
    prompt_tokens: int
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    ok: bool = True

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    def itls(self) -> list[float]:
        """Inter-token latencies: each chunk's gap spread over the tokens it carried."""
        out = []
        for i in range(1, len(self.chunk_times)):
            gap = self.chunk_times[i] - self.chunk_times[i - 1]
            n = max(self.chunk_tokens[i], 1)
            out.extend([gap / n] * n)
        return out


StreamFn = Callable[[list[int], SamplingParams], AsyncIterator[StreamChunk]]


async def run_streams(stream: StreamFn, prompts: list[list[int]], params: list[SamplingParams],
                      concurrency: int | None = None, progress: str | None = None,
                      ) -> tuple[list[RequestRecord], float]:
    """Stream every request (at most ``concurrency`` in flight) and time its chunks; returns records
    and the wall time. A request fails (``ok`` false) if it raises or ends short of max_new_tokens.
    ``progress``: the label of a progress bar of finished requests (on stderr, on a terminal only)."""
    gate = asyncio.Semaphore(concurrency or len(prompts) or 1)
    bar = tqdm(total=len(prompts), desc=progress, unit="req", disable=None if progress else True, leave=False)

    async def one(prompt: list[int], sp: SamplingParams) -> RequestRecord:
        async with gate:
            rec = RequestRecord(time.perf_counter(), len(prompt))
            try:
                async for chunk in stream(prompt, sp):
                    if chunk.token_ids:
                        rec.chunk_times.append(time.perf_counter())
                        rec.chunk_tokens.append(len(chunk.token_ids))
                rec.ok = rec.output_tokens == sp.max_new_tokens
            except Exception as e:  # a failed request is counted, not fatal
                print(f"request failed: {type(e).__name__}: {e}")
                rec.ok = False
            bar.update(1)
            return rec

    t0 = time.perf_counter()
    with bar:
        records = await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))
    return list(records), time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(records: list[RequestRecord], duration: float) -> dict[str, float]:
    """The harness figures: counts, throughputs, TTFT and ITL statistics (ms)."""
    ok = [r for r in records if r.ok]
    inp = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    itls = [x * 1e3 for r in ok for x in r.itls()]
    return {
        "successful_requests": len(ok),
        "duration_s": duration,
        "total_input_tokens": inp,
        "total_output_tokens": out,
        "request_throughput": len(ok) / duration,
        "input_throughput": inp / duration,
        "output_throughput": out / duration,
        "total_throughput": (inp + out) / duration,
        "mean_ttft_ms": statistics.fmean(ttfts) if ttfts else float("nan"),
        "p50_ttft_ms": _pct(ttfts, 50),
        "p99_ttft_ms": _pct(ttfts, 99),
        "mean_itl_ms": statistics.fmean(itls) if itls else float("nan"),
        "p50_itl_ms": _pct(itls, 50),
        "p99_itl_ms": _pct(itls, 99),
    }


LABELS = [
    ("successful_requests", "Successful requests", "{:d}"),
    ("duration_s", "Benchmark duration (s)", "{:.2f}"),
    ("total_input_tokens", "Total input tokens", "{:d}"),
    ("total_output_tokens", "Total generated tokens", "{:d}"),
    ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
    ("input_throughput", "Input token throughput (tok/s)", "{:.1f}"),
    ("output_throughput", "Output token throughput (tok/s)", "{:.1f}"),
    ("total_throughput", "Total token throughput (tok/s)", "{:.1f}"),
    ("mean_ttft_ms", "Mean TTFT (ms)", "{:.2f}"),
    ("p50_ttft_ms", "Median TTFT (ms)", "{:.2f}"),
    ("p99_ttft_ms", "P99 TTFT (ms)", "{:.2f}"),
    ("mean_itl_ms", "Mean ITL (ms)", "{:.2f}"),
    ("p50_itl_ms", "Median ITL (ms)", "{:.2f}"),
    ("p99_itl_ms", "P99 ITL (ms)", "{:.2f}"),
]


def format_report(title: str, columns: dict[str, dict[str, float]]) -> str:
    """A side-by-side table of one or more result columns (e.g. in-process vs gRPC)."""
    names = list(columns)
    width = max(len(n) for n in names) + 2
    lines = [f"{'=' * 20} {title} {'=' * 20}", f"{'':<34}" + "".join(f"{n:>{max(width, 14)}}" for n in names)]
    for key, label, fmt in LABELS:
        cells = []
        for n in names:
            v = columns[n].get(key, float("nan"))
            cells.append(fmt.format(int(v)) if fmt == "{:d}" else fmt.format(v))
        lines.append(f"{label:<34}" + "".join(f"{c:>{max(width, 14)}}" for c in cells))
    return "\n".join(lines)


def model_weight_bytes(cfg, itemsize: int) -> int:
    """Bytes of the weights a decode step reads, from a ``ModelConfig`` (all experts counted for MoE
    would overstate a step: only the routed experts' share is read, at most all of them)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    attn = h * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    if cfg.is_moe:
        mlp = 3 * h * cfg.moe_intermediate_size * cfg.num_experts_per_tok  # experts touched by one token
    else:
        mlp = 3 * h * cfg.intermediate_size
    lm_head = cfg.vocab_size * h
    return (layers * (attn + mlp) + lm_head) * itemsize


def measure_copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write counted (median of 10 copies)."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[2:])


def decode_roofline_tok_s(*, weight_bytes: int, kv_bytes_per_token: int, batch: int, mean_context: float,
                          bandwidth_bytes_s: float) -> float:
    """Output tok/s bound of a decode step that reads all weights once and every sequence's KV."""
    step_bytes = weight_bytes + batch * mean_context * kv_bytes_per_token
    return batch * bandwidth_bytes_s / step_bytes
