"""Engine: the in-process API (generate, async_generate, stream, abort, pause, continue_, ...).

The engine loop runs in a background thread; every method here validates its input in the
caller's thread first, so a bad request raises at once and never reaches the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

from rollout.detokenize import TextDeltas
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
from rollout.engine.prompts import Messages, PromptInputs, Prompts, Sampling, Texts, build_requests
from rollout.errors import InvalidArgumentError, error_from_code
from rollout.model_source import resolve_model_path
from rollout.types import (
    EngineInfo,
    GenerateOutput,
    PauseMode,
    StreamChunk,
    SwapResult,
    parse_memory_tags,
    parse_pause_mode,
)
from weight_sync.buckets import WireLayout
from weight_sync.sources import CudaIpcSource, SharedMemorySource, Source, source_from_dict


class Engine:
    """An inference engine over one Hugging Face model.

    ``Engine("path/to/model", device="cpu", dtype="float32", page_size=1, max_total_tokens=None,
    max_running_requests=256, chunked_prefill_size=4096, ...)``: options are the fields of the
    configs in ``rollout.config``; an unknown option raises ``InvalidArgumentError``.
    ``separate_process=True`` runs the engine loop in its own process rather than a thread.
    ``tp_size=N`` runs N tensor-parallel ranks, one process each (gloo on CPU, NCCL on GPUs
    ``device``, ``device``+1, ...); ``ep_size=N`` likewise, with whole experts per rank.

    The model is a directory, a Hugging Face Hub id (``"Qwen/Qwen3-0.6B"``: fetched into the Hub
    cache, or taken from it when offline), or nothing: ``Engine()`` runs the embedded default model,
    a small Qwen3-shaped model with random weights, a byte-level tokenizer and a chat template,
    written under ``$ROLLOUT_CACHE`` (default ``~/.cache/rollout``) on first use. Its text is
    random; it is there to try the API and the service anywhere without a download.
    """

    def __init__(self, model_path: str | None = None, *, separate_process: bool = False, **options: Any) -> None:
        # separate_process: run the engine loop in a spawned process (as the server does) instead of
        # a thread, so the caller's Python work (e.g. asyncio consumers of many streams) does not
        # compete with the engine loop for the GIL.
        # With tensor-parallel ranks every rank is a process of its own (rank 0 among them).
        several_ranks = options.get("tp_size", 1) != 1 or options.get("ep_size", 1) != 1
        start = start_engine_process if separate_process or several_ranks else start_engine_thread
        self._client = start(resolve_model_path(model_path), **options)
        self.tokenizer = self._client.tokenizer
        self.limits = self._client.limits
        self._ids = itertools.count()

    # ------------------------------------------------------------------ building requests
    def _requests(self, inputs: PromptInputs, sampling_params: Sampling | Sequence[Sampling],
                  request_id: str | Sequence[str] | None, stream: bool, options: dict[str, Any]) -> list[AddRequest]:
        known = {"return_logprob", "return_raw_logprob", "top_logprobs_num", "return_routed_experts"}
        for key in options:
            if key not in known:
                raise InvalidArgumentError("unknown argument", field=key)
        return build_requests(inputs, sampling_params, request_id, self.limits, self.tokenizer, self._ids,
                              stream=stream, **options)

    def _assembler(self, req: AddRequest) -> OutputAssembler:
        return OutputAssembler(req.request_id, req.sampling.n, logprobs=req.return_logprob,
                               raw_logprobs=req.return_raw_logprob, top_logprobs=req.top_logprobs_num > 0,
                               routed_experts=req.return_routed_experts)

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
        messages: Messages = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        return_logprob: bool = False,
        return_raw_logprob: bool = False,
        top_logprobs_num: int = 0,
        request_id: str | Sequence[str] | None = None,
        return_routed_experts: bool = False,
    ) -> list[GenerateOutput]:
        """Generate for one prompt or a batch; returns ``n`` outputs per prompt, prompt-major.

        The prompt is token ids, ``text``, or ``messages``: a conversation of OpenAI-style dicts (or a
        list of conversations), rendered with the model's chat template, ``tools`` (JSON schemas) and
        ``chat_template_kwargs`` handed to the template. ``sampling_params`` is a ``SamplingParams``, a
        dict of its fields (as the gRPC clients take), or a list with one of those per prompt.

        ``return_routed_experts`` (MoE models, engine built with ``enable_return_routed_experts=True``):
        each output gets ``routed_experts`` (one int16 row ``(MoE layers, top_k)`` per output token,
        from the forward that sampled it) and ``prompt_routed_experts`` (the ``P - 1`` prompt positions
        before); together they cover every position but the last token, as in SGLang and vLLM. See
        ``GenerateOutput``.
        """
        inputs = PromptInputs(input_ids, text, messages, tools, chat_template_kwargs)
        options = dict(return_logprob=return_logprob, return_raw_logprob=return_raw_logprob,
                       top_logprobs_num=top_logprobs_num, return_routed_experts=return_routed_experts)
        reqs = self._requests(inputs, sampling_params, request_id, False, options)
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
        """asyncio version of ``generate`` (same keywords); cancelling it aborts its requests."""
        inputs = PromptInputs.pop_from(input_ids, kwargs)
        reqs = self._requests(inputs, sampling_params, kwargs.pop("request_id", None), False, kwargs)

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
        """Chunks of new tokens for one prompt (all its ``n`` samples, told apart by ``index``); the
        prompt keywords are those of ``generate``. With a tokenizer, each chunk's ``text`` is the text
        its tokens add (never half a character; a sample's chunks joined give its whole text)."""
        req = self._one_stream_request(input_ids, sampling_params, kwargs)
        deltas = TextDeltas(self.tokenizer) if self.tokenizer is not None else None
        for chunk in self._client.stream(req):
            if deltas is not None:
                deltas.add(chunk)
            yield chunk

    async def async_stream(
        self,
        input_ids: Sequence[int] | None = None,
        sampling_params: Sampling = None,
        **kwargs: Any,
    ) -> AsyncIterator[StreamChunk]:
        """asyncio version of ``stream``."""
        req = self._one_stream_request(input_ids, sampling_params, kwargs)
        deltas = TextDeltas(self.tokenizer) if self.tokenizer is not None else None
        async for chunk in self._client.astream(req):
            if deltas is not None:
                deltas.add(chunk)
            yield chunk

    def _one_stream_request(self, input_ids: Any, sampling_params: Any, kw: dict[str, Any]) -> AddRequest:
        inputs = PromptInputs.pop_from(input_ids, kw)
        if inputs.text is not None and not isinstance(inputs.text, str):
            raise InvalidArgumentError("a stream takes one prompt", field="text")
        if inputs.input_ids is not None and len(inputs.input_ids) and not isinstance(inputs.input_ids[0], int):
            raise InvalidArgumentError("a stream takes one prompt", field="input_ids")
        reqs = self._requests(inputs, sampling_params, kw.pop("request_id", None), True, kw)
        if len(reqs) != 1:
            raise InvalidArgumentError("a stream takes one prompt", field="messages")
        return reqs[0]

    # ------------------------------------------------------------------ control
    def abort(self, request_id: str | Sequence[str] | None = None) -> None:
        """Abort requests by id, or all when None; they finish with reason abort."""
        ids = None if request_id is None else ([request_id] if isinstance(request_id, str) else list(request_id))
        if ids is not None and not all(isinstance(i, str) for i in ids):
            raise InvalidArgumentError("request ids are strings: one, or a list of them", field="request_id")
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
        return self._client.call(UpdateWeightsFromDistributed(layout, group_name, version, _flag(swap)))

    def update_weights_from_tensor(self, *, names: Sequence[str], dtypes: Sequence[str],
                                   shapes: Sequence[Sequence[int]], sources: Sequence[Any],
                                   offsets: Sequence[int] | None = None, bucket_sizes: Sequence[int] | None = None,
                                   flat_bucket: bool = False, version: int | None = None,
                                   swap: bool = False, more: bool = False) -> int | SwapResult:
        """Load weights shared by a colocated trainer: one source per bucket (a ``weight_sync.sources``
        value or its wire dict, CUDA IPC handle or shared-memory segment). ``swap``: as for
        ``update_weights_from_distributed``. ``more``: further calls carry more of this update (same
        version); generation waits for the last one (``more=False``), and if a call fails after
        earlier ones were written, the weights count as invalid until a full update."""
        layout = WireLayout(names, dtypes, shapes, offsets, bucket_sizes, flat_bucket)
        return self._client.call(UpdateWeightsFromTensor(layout, parse_sources(sources), version, _flag(swap),
                                                         _flag(more, "more")))

    def update_weights_from_disk(self, model_path: str, version: int | None = None,
                                 swap: bool = False) -> int | SwapResult:
        """Reload the weights from a checkpoint directory. ``swap``: as for ``update_weights_from_distributed``."""
        return self._client.call(UpdateWeightsFromDisk(model_path, version, _flag(swap)))

    def release_memory(self, tags: Sequence[str] | str | None = None) -> Any:
        """Free the GPU memory of these tags (weights, kv_cache, cuda_graph; None: all)."""
        return self._client.call(ReleaseMemory(parse_memory_tags(tags)))

    def resume_memory(self, tags: Sequence[str] | str | None = None) -> Any:
        """Map released memory back (same addresses); weights return only if they were backed up."""
        return self._client.call(ResumeMemory(parse_memory_tags(tags)))

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



def _flag(value: Any, field: str = "swap") -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"must be true or false, got {value!r}", field=field)
    return value


def parse_sources(sources: Any) -> tuple[Source, ...]:
    """Bucket sources given as ``weight_sync.sources`` values or their wire dicts."""
    if not isinstance(sources, (list, tuple)):
        raise InvalidArgumentError("must be a list with one source per bucket", field="sources")
    return tuple(s if isinstance(s, (CudaIpcSource, SharedMemorySource)) else source_from_dict(s, f"sources[{i}]")
                 for i, s in enumerate(sources))
