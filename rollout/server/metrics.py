"""Prometheus metrics of one server (``/metrics`` of the HTTP front end), in the text format.

Two sources:

- what passes through the ``EngineClient`` (this object is its ``EngineObserver``): time to first
  token and inter-token latency of streamed requests, end-to-end latency, prompt / generated /
  prefix-cached token counts, finished samples by reason, failed requests by status, and the
  duration of every control call (weight updates, memory release / resume, pause, ...), with the
  time spent paused (from a pause's reply to the next continue's);
- a ``GetInfo`` snapshot taken at scrape time (``set_info``): running / waiting / paused requests,
  KV usage, weight version, pause state and memory state per tag.

Names start with ``rollout_``; rates (tokens/s, hit rate over a window) are PromQL over the
counters, and two gauges give the same for dashboards that read values directly: generated tokens
per second over the last ``THROUGHPUT_WINDOW_S`` seconds and the prefix-cache hit ratio since start.
Every metric lives in this object's own registry, so two servers in one process never mix.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from rollout.engine.messages import Continue, ControlCommand, GetInfo, Pause, RequestFailed
from rollout.types import EngineInfo, StreamChunk

if TYPE_CHECKING:
    from rollout.engine.messages import AddRequest

THROUGHPUT_WINDOW_S = 10
MEMORY_STATES = ("active", "released")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
CONTROL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Control commands not worth a duration sample (a scrape itself sends GetInfo).
_UNTIMED = (GetInfo,)


@dataclass(slots=True)
class _Tracked:
    """What the metrics remember about one request until its last sample finishes."""

    submitted: float
    stream: bool
    samples_left: int
    first_token: bool = False
    last_token_at: dict[int, float] = field(default_factory=dict)  # sample index -> time of its last tokens


class ServerMetrics:
    """The metrics of one server: an ``EngineObserver`` plus a snapshot of ``EngineInfo``."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ttft = Histogram("rollout_time_to_first_token_seconds", "Time from submission to the first token "
                              "(streamed requests)", registry=reg, buckets=TTFT_BUCKETS)
        self.itl = Histogram("rollout_inter_token_latency_seconds", "Time between tokens of one sample, per token "
                             "(streamed requests)", registry=reg, buckets=ITL_BUCKETS)
        self.e2e = Histogram("rollout_e2e_request_latency_seconds", "Time from submission to the last sample's "
                             "end", registry=reg, buckets=E2E_BUCKETS)
        self.prompt_tokens = Counter("rollout_prompt_tokens", "Prompt tokens of finished samples", registry=reg)
        self.cached_tokens = Counter("rollout_prefix_cache_hit_tokens", "Prompt tokens of finished samples whose "
                                     "KV came from the prefix cache", registry=reg)
        self.generation_tokens = Counter("rollout_generation_tokens", "Tokens generated", registry=reg)
        self.finished = Counter("rollout_request_success", "Samples finished, by finish reason",
                                ["finish_reason"], registry=reg)
        self.failed = Counter("rollout_request_failure", "Requests failed, by status", ["code"], registry=reg)
        self.control = Histogram("rollout_control_duration_seconds", "Duration of control calls (weight updates, "
                                 "memory release / resume, pause, ...)", ["command", "outcome"], registry=reg,
                                 buckets=CONTROL_BUCKETS)
        self.update_seconds = Counter("rollout_weight_update_seconds", "Time spent in weight updates",
                                      registry=reg)
        self._lock = threading.Lock()
        self._requests: dict[str, _Tracked] = {}
        self._paused_total = 0.0
        self._paused_since: float | None = None
        self._prompt_total = 0  # the counters' values, for the hit ratio
        self._cached_total = 0
        self._window: deque[list[float]] = deque()  # [whole second, tokens generated in it]
        self.info: EngineInfo | None = None  # the snapshot a scrape reports (set_info)
        reg.register(_SnapshotCollector(self))

    # ------------------------------------------------------------------ EngineObserver
    def on_submit(self, req: AddRequest) -> None:
        with self._lock:
            self._requests[req.request_id] = _Tracked(time.monotonic(), req.stream, req.sampling.n)

    def on_events(self, events: list[StreamChunk | RequestFailed]) -> None:
        now = time.monotonic()
        tokens = 0
        with self._lock:
            for ev in events:
                state = self._requests.get(ev.request_id)
                if state is None:
                    continue
                if isinstance(ev, RequestFailed):
                    del self._requests[ev.request_id]
                    self.failed.labels(ev.error_code).inc()
                    continue
                tokens += len(ev.token_ids)
                self._timings(state, ev, now)
                if ev.finished:
                    self._finish(state, ev, now)
            if tokens:
                self._count_tokens(now, tokens)
        if tokens:
            self.generation_tokens.inc(tokens)

    def _timings(self, state: _Tracked, chunk: StreamChunk, now: float) -> None:
        n = len(chunk.token_ids)
        if not state.stream or n == 0:
            return  # a request that is not streamed shows its tokens only when it ends
        if not state.first_token:
            state.first_token = True
            self.ttft.observe(now - state.submitted)
        last = state.last_token_at.get(chunk.index)
        if last is not None:
            for _ in range(n):  # a chunk of several tokens: each waited its share
                self.itl.observe((now - last) / n)
        state.last_token_at[chunk.index] = now

    def _finish(self, state: _Tracked, chunk: StreamChunk, now: float) -> None:
        reason = chunk.finish_reason.value if chunk.finish_reason is not None else "unknown"
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(chunk.prompt_tokens)
        self.cached_tokens.inc(chunk.cached_tokens)
        self._prompt_total += chunk.prompt_tokens
        self._cached_total += chunk.cached_tokens
        state.samples_left -= 1
        if state.samples_left <= 0:
            self.e2e.observe(now - state.submitted)
            del self._requests[chunk.request_id]

    def _count_tokens(self, now: float, tokens: int) -> None:
        second = float(int(now))
        if self._window and self._window[-1][0] == second:
            self._window[-1][1] += tokens
        else:
            self._window.append([second, float(tokens)])
        while self._window and self._window[0][0] <= second - THROUGHPUT_WINDOW_S:
            self._window.popleft()

    def on_control(self, command: ControlCommand, seconds: float, error_code: str | None) -> None:
        if isinstance(command, _UNTIMED):
            return
        name = type(command).__name__
        self.control.labels(name, "error" if error_code else "ok").observe(seconds)
        if name.startswith("UpdateWeights"):
            self.update_seconds.inc(seconds)
        if error_code:
            return
        now = time.monotonic()
        with self._lock:
            if isinstance(command, Pause) and self._paused_since is None:
                self._paused_since = now
            elif isinstance(command, Continue) and self._paused_since is not None:
                self._paused_total += now - self._paused_since
                self._paused_since = None

    # ------------------------------------------------------------------ scrape
    def set_info(self, info: EngineInfo | None) -> None:
        """The engine state the next ``render`` reports (None: the engine is not ready)."""
        self.info = info

    def paused_seconds(self) -> float:
        """Time spent paused since start, the pause in progress included."""
        with self._lock:
            ongoing = time.monotonic() - self._paused_since if self._paused_since is not None else 0.0
            return self._paused_total + ongoing

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``THROUGHPUT_WINDOW_S`` whole seconds."""
        with self._lock:
            now = float(int(time.monotonic()))
            recent = sum(n for s, n in self._window if now - THROUGHPUT_WINDOW_S <= s < now)
        return recent / THROUGHPUT_WINDOW_S

    def prefix_cache_hit_ratio(self) -> float:
        """Share of finished samples' prompt tokens that came from the prefix cache, since start."""
        with self._lock:
            return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _SnapshotCollector:
    """Metrics read at scrape time: the ``EngineInfo`` snapshot and the derived gauges."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        info = m.info
        yield GaugeMetricFamily("rollout_engine_ready", "1 when the engine is loaded and answers",
                                int(info is not None))
        yield CounterMetricFamily("rollout_paused_seconds", "Time spent paused", value=m.paused_seconds())
        yield GaugeMetricFamily("rollout_generation_throughput_tokens_per_second",
                                f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S} s",
                                m.tokens_per_second())
        yield GaugeMetricFamily("rollout_prefix_cache_hit_ratio", "Share of prompt tokens served from the prefix "
                                "cache since start", m.prefix_cache_hit_ratio())
        if info is None:
            return
        model = GaugeMetricFamily("rollout_model_info", "The served model", labels=["model_name", "model_path"])
        model.add_metric([m.model_name, info.model_path], 1)
        yield model
        for name, doc, value in (
            ("rollout_num_requests_running", "Samples decoding", info.num_running),
            ("rollout_num_requests_waiting", "Samples waiting to start (or retracted)", info.num_waiting),
            ("rollout_num_requests_paused", "Samples frozen by an in-place pause", info.num_paused),
            ("rollout_kv_cache_total_tokens", "KV cache capacity in tokens", info.kv_total_tokens),
            ("rollout_kv_cache_used_tokens", "KV tokens held by requests", info.kv_used_tokens),
            ("rollout_kv_cache_cached_tokens", "KV tokens held only by the prefix cache", info.kv_cached_tokens),
            ("rollout_kv_cache_usage_ratio", "Share of the KV cache held by requests",
             info.kv_used_tokens / info.kv_total_tokens if info.kv_total_tokens else 0.0),
            ("rollout_weight_version", "Version of the weights being served", info.weight_version),
            ("rollout_weights_valid", "1 unless the weights are partly written or released", int(info.weights_valid)),
            ("rollout_paused", "1 while generation is paused", int(info.paused)),
        ):
            yield GaugeMetricFamily(name, doc, value)
        yield CounterMetricFamily("rollout_retractions", "Running samples sent back to the queue for lack of KV",
                                  value=info.num_retractions)
        for name, doc, value in (
            ("rollout_spec_draft_tokens", "Speculative draft tokens proposed", info.spec_drafted),
            ("rollout_spec_accepted_tokens", "Speculative draft tokens accepted", info.spec_accepted),
            ("rollout_spec_verify_sequence_steps", "Sequence-steps that verified drafts (mean accepted length: "
             "1 + accepted / this)", info.spec_verified),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        state = GaugeMetricFamily("rollout_memory_state", "1 for the state each memory tag is in",
                                  labels=["tag", "state"])
        size = GaugeMetricFamily("rollout_memory_bytes", "Bytes of each memory tag", labels=["tag"])
        for tag, s in sorted(info.memory.items()):
            for name in MEMORY_STATES:
                state.add_metric([tag, name], int(s.get("state") == name))
            size.add_metric([tag], float(s.get("bytes", 0)))
        yield state
        yield size
