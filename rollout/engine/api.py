"""Engine: the in-process API (generate, async_generate, stream, abort, pause, continue_, ...).

The engine loop runs in a background thread; every method here validates its input in the
caller's thread first, so a bad request raises at once and never reaches the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import uuid
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

from rollout.engine.messages import (
    AddRequest,
    CheckIntegrity,
    Continue,
    DestroyWeightGroup,
    FlushCache,
    GetInfo,
    InitWeightGroup,
    Pause,
    RebalanceExperts,
    ReleaseMemory,
    ResumeMemory,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
)
from rollout.engine.output_assembly import OutputAssembler
from rollout.engine.process import start_engine_process, start_engine_thread
from rollout.engine.request_validation import make_add_request
from rollout.errors import InvalidArgumentError, error_from_code
from rollout.types import (
    EngineInfo,
    GenerateOutput,
    PauseMode,
    SamplingParams,
    StreamChunk,
    SwapResult,
    as_sampling_params,
    parse_pause_mode,
)
from weight_sync.buckets import WireLayout
from weight_sync.sources import CudaIpcSource, SharedMemorySource, Source, source_from_dict

Prompts = Sequence[int] | Sequence[Sequence[int]] | None
Texts = str | Sequence[str] | None
Sampling = SamplingParams | Mapping[str, Any] | None  # a dict is checked like SamplingParams.from_dict


class Engine:
    """An inference engine over one Hugging Face model directory.

    ``Engine("path/to/model", device="cpu", dtype="float32", page_size=1, max_total_tokens=None,
    max_running_requests=256, chunked_prefill_size=4096, ...)``: options are the fields of the
    configs in ``rollout.config``; an unknown option raises ``InvalidArgumentError``.
    ``separate_process=True`` runs the engine loop in its own process rather than a thread.
    ``tp_size=N`` runs N tensor-parallel ranks, one process each (gloo on CPU, NCCL on GPUs
    ``device``, ``device``+1, ...); ``ep_size=N`` likewise, with whole experts per rank.
    """

    def __init__(self, model_path: str, *, separate_process: bool = False, **options: Any) -> None:
        # separate_process: run the engine loop in a spawned process (as the server does) instead of
        # a thread, so the caller's Python work (e.g. asyncio consumers of many streams) does not
        # compete with the engine loop for the GIL.
        # With tensor-parallel ranks every rank is a process of its own (rank 0 among them).
        several_ranks = options.get("tp_size", 1) != 1 or options.get("ep_size", 1) != 1
        start = start_engine_process if separate_process or several_ranks else start_engine_thread
        self._client = start(model_path, **options)
        self.tokenizer = self._client.tokenizer
        self.limits = self._client.limits
        self._ids = itertools.count()

    # ------------------------------------------------------------------ building requests
    def _requests(
        self,
        input_ids: Prompts,
        text: Texts,
        sampling_params: Sampling | Sequence[Sampling],
        return_logprob: bool,
        return_raw_logprob: bool,
        top_logprobs_num: int,
        request_id: str | Sequence[str] | None,
        stream: bool,
    ) -> list[AddRequest]:
        if input_ids is not None and text is not None:
            raise InvalidArgumentError("give input_ids or text, not both", field="input_ids")
        if text is not None:
            prompts: list[Any] = [text] if isinstance(text, str) else list(text)
        elif input_ids is not None:
            batch = len(input_ids) > 0 and not isinstance(input_ids[0], int)
            prompts = [list(p) for p in input_ids] if batch else [list(input_ids)]
        else:
            raise InvalidArgumentError("a prompt is required", field="input_ids")
        if not prompts:
            raise InvalidArgumentError("no prompts given", field="input_ids")
        if isinstance(sampling_params, (list, tuple)):  # one per prompt
            params = [as_sampling_params(p) for p in sampling_params]
            if len(params) != len(prompts):
                raise InvalidArgumentError(
                    f"{len(params)} sampling params for {len(prompts)} prompts", field="sampling_params"
                )
        else:  # one for all: SamplingParams, a dict or None
            params = [as_sampling_params(sampling_params)] * len(prompts)
        if request_id is None:
            base = uuid.uuid4().hex[:12]
            ids = [f"{base}-{next(self._ids)}" for _ in prompts]
        else:
            ids = [request_id] if isinstance(request_id, str) else list(request_id)
            if len(ids) != len(prompts):
                raise InvalidArgumentError("one request id per prompt", field="request_id")
        return [
            make_add_request(
                rid,
                input_ids=None if isinstance(p, str) else p,
                text=p if isinstance(p, str) else None,
                sampling=sp,
                limits=self.limits,
                tokenizer=self.tokenizer,
                return_logprob=return_logprob,
                return_raw_logprob=return_raw_logprob,
                top_logprobs_num=top_logprobs_num,
                stream=stream,
            )
            for rid, p, sp in zip(ids, prompts, params)
        ]

    def _assembler(self, req: AddRequest) -> OutputAssembler:
        return OutputAssembler(req.request_id, req.sampling.n, logprobs=req.return_logprob,
                               raw_logprobs=req.return_raw_logprob, top_logprobs=req.top_logprobs_num > 0)

    def _finish(self, outs: list[GenerateOutput]) -> list[GenerateOutput]:
        if self.tokenizer is not None:
            for o in outs:
                o.text = self.tokenizer.decode(o.output_ids)
        return outs

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: Prompts = None,
        sampling_params: Sampling | Sequence[Sampling] = None,
        *,
        text: Texts = None,
        return_logprob: bool = False,
        return_raw_logprob: bool = False,
        top_logprobs_num: int = 0,
        request_id: str | Sequence[str] | None = None,
    ) -> list[GenerateOutput]:
        """Generate for one prompt or a batch; returns ``n`` outputs per prompt, prompt-major.

        ``sampling_params`` is a ``SamplingParams``, a dict of its fields (as the gRPC clients take),
        or a list with one of those per prompt.
        """
        reqs = self._requests(input_ids, text, sampling_params, return_logprob, return_raw_logprob,
                              top_logprobs_num, request_id, stream=False)
        done: queue.Queue = queue.Queue()
        assemblers = {r.request_id: self._assembler(r) for r in reqs}
        submitted: list[str] = []
        try:
            for r in reqs:
                self._client.submit(r, done.put)
                submitted.append(r.request_id)
            pending = len(reqs)
            while pending:
                ev = done.get()
                if not isinstance(ev, StreamChunk):
                    raise error_from_code(ev.error_code, ev.error_message)
                if assemblers[ev.request_id].add(ev):
                    pending -= 1
            submitted.clear()
        finally:
            if submitted:  # interrupted or failed: do not leave the rest running
                self._client.abort(submitted)
        return self._finish([o for r in reqs for o in assemblers[r.request_id].outputs])

    async def async_generate(
        self,
        input_ids: Prompts = None,
        sampling_params: Sampling | Sequence[Sampling] = None,
        **kwargs: Any,
    ) -> list[GenerateOutput]:
        """asyncio version of ``generate``; cancelling it aborts its requests."""
        reqs = self._requests(input_ids, kwargs.pop("text", None), sampling_params,
                              kwargs.pop("return_logprob", False), kwargs.pop("return_raw_logprob", False),
                              kwargs.pop("top_logprobs_num", 0), kwargs.pop("request_id", None), stream=False)
        if kwargs:
            raise InvalidArgumentError("unknown argument", field=next(iter(kwargs)))

        async def one(req: AddRequest) -> list[GenerateOutput]:
            asm = self._assembler(req)
            async for chunk in self._client.astream(req):
                asm.add(chunk)
            return asm.outputs

        results = await asyncio.gather(*(one(r) for r in reqs))
        return self._finish([o for outs in results for o in outs])

    def stream(
        self,
        input_ids: Sequence[int] | None = None,
        sampling_params: Sampling = None,
        **kwargs: Any,
    ) -> Iterator[StreamChunk]:
        """Chunks of new tokens for one prompt (all its ``n`` samples, told apart by ``index``)."""
        req = self._one_stream_request(input_ids, sampling_params, kwargs)
        yield from self._client.stream(req)

    async def async_stream(
        self,
        input_ids: Sequence[int] | None = None,
        sampling_params: Sampling = None,
        **kwargs: Any,
    ) -> AsyncIterator[StreamChunk]:
        """asyncio version of ``stream``."""
        req = self._one_stream_request(input_ids, sampling_params, kwargs)
        async for chunk in self._client.astream(req):
            yield chunk

    def _one_stream_request(self, input_ids: Any, sampling_params: Any, kw: dict[str, Any]) -> AddRequest:
        text = kw.pop("text", None)
        reqs = self._requests(
            None if input_ids is None else [list(input_ids)], None if text is None else [text], sampling_params,
            kw.pop("return_logprob", False), kw.pop("return_raw_logprob", False), kw.pop("top_logprobs_num", 0),
            kw.pop("request_id", None), stream=True,
        )
        if kw:
            raise InvalidArgumentError("unknown argument", field=next(iter(kw)))
        return reqs[0]

    # ------------------------------------------------------------------ control
    def abort(self, request_id: str | Sequence[str] | None = None) -> None:
        """Abort requests by id, or all when None; they finish with reason abort."""
        ids = None if request_id is None else ([request_id] if isinstance(request_id, str) else list(request_id))
        self._client.abort(ids)

    def pause(self, mode: PauseMode | str = PauseMode.ABORT) -> None:
        """Pause generation (ABORT, RETRACT or IN_PLACE); new requests wait until ``continue_``."""
        self._client.call(Pause(parse_pause_mode(mode)))

    def continue_(self) -> None:
        """Resume after ``pause``."""
        self._client.call(Continue())

    def flush_cache(self) -> None:
        """Drop the prefix cache."""
        self._client.call(FlushCache())

    def info(self) -> EngineInfo:
        """The engine's state: weight version, pause, queues, KV and memory per tag."""
        return self._client.call(GetInfo())

    # ------------------------------------------------------------------ weights and memory
    def engine_ranks(self) -> int:
        """Ranks this engine adds to a weight-update group (its ``tp_size``)."""
        return self._client.info.tp_size

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                 group_name: str = "default", backend: str = "nccl",
                                 timeout_s: float | None = None) -> str:
        """Join a trainer's weight-update group (see ``weight_sync``); returns once it formed.
        Generation goes on while the join waits for the trainer."""
        return self._client.call(InitWeightGroup(master_address, master_port, rank_offset, world_size, group_name,
                                                 backend, timeout_s))

    def destroy_weight_update_group(self, group_name: str = "default") -> str:
        """Leave and destroy a weight-update group."""
        return self._client.call(DestroyWeightGroup(group_name))

    def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], offsets: Sequence[int] | None = None,
                                        bucket_sizes: Sequence[int] | None = None, flat_bucket: bool = False,
                                        group_name: str = "default", version: int | None = None,
                                        swap: bool = False) -> int | SwapResult:
        """Receive weights broadcast by the trainer over a formed group and load them in place;
        returns the new version (None: the current one + 1).

        ``swap``: receive into a shadow copy while generation goes on with the current weights, then
        switch between two steps (no pause); returns a ``SwapResult`` (which says whether the engine
        had to take the pausing path for lack of memory)."""
        layout = WireLayout(names, dtypes, shapes, offsets, bucket_sizes, flat_bucket)
        return self._client.call(UpdateWeightsFromDistributed(layout, group_name, version, _swap(swap)))

    def update_weights_from_tensor(self, *, names: Sequence[str], dtypes: Sequence[str],
                                   shapes: Sequence[Sequence[int]], sources: Sequence[Any],
                                   offsets: Sequence[int] | None = None, bucket_sizes: Sequence[int] | None = None,
                                   flat_bucket: bool = False, version: int | None = None,
                                   swap: bool = False) -> int | SwapResult:
        """Load weights shared by a colocated trainer: one source per bucket (a ``weight_sync.sources``
        value or its wire dict, CUDA IPC handle or shared-memory segment). ``swap``: as for
        ``update_weights_from_distributed``."""
        layout = WireLayout(names, dtypes, shapes, offsets, bucket_sizes, flat_bucket)
        return self._client.call(UpdateWeightsFromTensor(layout, parse_sources(sources), version, _swap(swap)))

    def update_weights_from_disk(self, model_path: str, version: int | None = None,
                                 swap: bool = False) -> int | SwapResult:
        """Reload the weights from a checkpoint directory. ``swap``: as for ``update_weights_from_distributed``."""
        return self._client.call(UpdateWeightsFromDisk(model_path, version, _swap(swap)))

    def release_memory(self, tags: Sequence[str] | str | None = None) -> Any:
        """Free the GPU memory of these tags (weights, kv_cache, cuda_graph; None: all)."""
        return self._client.call(ReleaseMemory(_tags(tags)))

    def resume_memory(self, tags: Sequence[str] | str | None = None) -> Any:
        """Map released memory back (same addresses); weights return only if they were backed up."""
        return self._client.call(ResumeMemory(_tags(tags)))

    def rebalance_experts(self) -> dict[str, float | int]:
        """Place the experts by the tokens routed since the last rebalance (``ep_size`` > 1): hot experts
        get copies in the spare slots. Returns balancedness (mean/max rank load) before and after."""
        return self._client.call(RebalanceExperts())

    def check_integrity(self) -> None:
        """Raise if any KV slot leaked or the prefix cache is inconsistent (waits for the loop)."""
        self._client.call(CheckIntegrity())

    def shutdown(self) -> None:
        """Stop the engine; running requests end with reason abort."""
        self._client.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()



def _swap(swap: Any) -> bool:
    if not isinstance(swap, bool):
        raise InvalidArgumentError(f"must be true or false, got {swap!r}", field="swap")
    return swap


def _tags(tags: Sequence[str] | str | None) -> tuple[str, ...]:
    if tags is None:
        return ()
    return (tags,) if isinstance(tags, str) else tuple(tags)


def parse_sources(sources: Any) -> tuple[Source, ...]:
    """Bucket sources given as ``weight_sync.sources`` values or their wire dicts."""
    if not isinstance(sources, (list, tuple)):
        raise InvalidArgumentError("must be a list with one source per bucket", field="sources")
    return tuple(s if isinstance(s, (CudaIpcSource, SharedMemorySource)) else source_from_dict(s, f"sources[{i}]")
                 for i, s in enumerate(sources))
