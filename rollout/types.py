"""Public value types of the engine: sampling parameters, outputs, stream chunks, engine info.

These cross module and process boundaries; the gRPC layer converts protos to and from them at its
edge and nowhere else.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from rollout.errors import InvalidArgumentError, quoted

if TYPE_CHECKING:
    import numpy as np


class FinishReason(str, enum.Enum):
    """Why a sample ended."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens reached (or the context filled)
    ABORT = "abort"  # aborted by the caller, a pause in ABORT mode, or shutdown


class PauseMode(str, enum.Enum):
    """What happens to in-flight requests when generation is paused."""

    ABORT = "abort"  # end them now with their partial output
    RETRACT = "retract"  # back to the queue, KV freed, recomputed after continue
    IN_PLACE = "in_place"  # frozen with their KV, continue where they stopped


def parse_pause_mode(mode: PauseMode | str) -> PauseMode:
    """``mode`` as a ``PauseMode``; INVALID_ARGUMENT naming the modes when it is none of them."""
    try:
        return PauseMode(mode)
    except ValueError:
        raise InvalidArgumentError(
            f"unknown pause mode {quoted(mode)}; use one of {[m.value for m in PauseMode]}", field="mode") from None


def parse_memory_tags(tags: Any) -> tuple[str, ...]:
    """Memory tags given as None (all), one tag or a list of them; INVALID_ARGUMENT for anything else
    (which tags exist is the engine's to check)."""
    if tags is None:
        return ()
    if isinstance(tags, str):
        return (tags,)
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise InvalidArgumentError(f"must be a memory tag or a list of them, got {quoted(tags)}", field="tags")
    return tuple(tags)


# The largest top_k a request may give (the wire's int32; any value past the vocabulary means no cut).
TOP_K_MAX = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt. Defaults match SGLang / vLLM (temperature 1, no filtering)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0  # drop tokens below min_p * p(max), in [0, 1]
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # stop tokens are masked until this many were generated
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded output
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    ignore_eos: bool = False
    seed: int | None = None  # same seed, same tokens (sample i of n uses seed + i); not under draft / eagle
    n: int = 1  # samples of this prompt; they share the prompt's KV

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples so the object stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ``InvalidArgumentError`` naming the first bad field."""

        def bad(name: str, why: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"{why} (got {quoted(getattr(self, name))})", field=name)

        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise bad(name, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("top_k", "max_new_tokens", "min_new_tokens", "n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        if not -1 <= self.top_k <= TOP_K_MAX:
            raise bad("top_k", f"must be -1 (off), 0 (off) or positive, at most {TOP_K_MAX}")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be >= 1")
        if self.min_new_tokens < 0:
            raise bad("min_new_tokens", "must be >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", "must be <= max_new_tokens")
        if not 1 <= self.n <= 1024:
            raise bad("n", "must be in [1, 1024]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", "stop strings must be non-empty strings")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise bad("stop_token_ids", "must be non-negative integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from a plain dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise InvalidArgumentError(f"unknown sampling option; known: {sorted(known)}", field=key)
        return cls(**d)


def as_sampling_params(value: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
    """``value`` as ``SamplingParams``: a dict goes through ``from_dict`` (unknown keys are refused by
    name), None gives the defaults. The in-process engine and the gRPC clients share this."""
    if value is None:
        return SamplingParams()
    if isinstance(value, SamplingParams):
        return value
    if isinstance(value, Mapping):
        return SamplingParams.from_dict(dict(value))
    raise InvalidArgumentError(f"must be a SamplingParams or a dict (got {type(value).__name__})",
                               field="sampling_params")


# Template variables a request may not set: the renderer sets them from the request's own fields.
_RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to be rendered with the model's chat template (``rollout.chat_template``).

    ``messages`` are OpenAI-style dicts (``role``, ``content``, and whatever else the template reads:
    ``tool_calls``, ``tool_call_id``, ``reasoning_content``, ...); ``tools`` are JSON schemas handed to
    the template; ``template_kwargs`` extra template variables (e.g. ``{"enable_thinking": False}``).
    """

    messages: tuple[Mapping[str, Any], ...]
    tools: tuple[Mapping[str, Any], ...] | None = None
    add_generation_prompt: bool = True
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        msgs = self.messages
        if isinstance(msgs, (str, bytes, Mapping)) or not isinstance(msgs, (list, tuple)) or not msgs:
            raise InvalidArgumentError("must be a non-empty list of message dicts", field="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m.get("role"):
                raise InvalidArgumentError(f"message {i} must be a dict with a string 'role' (got {quoted(m)})",
                                           field="messages")
        object.__setattr__(self, "messages", tuple(msgs))
        if self.tools is not None:
            if isinstance(self.tools, (str, bytes, Mapping)) or not isinstance(self.tools, (list, tuple)) or any(
                    not isinstance(t, Mapping) for t in self.tools):
                raise InvalidArgumentError("must be a list of tool dicts (JSON schemas)", field="tools")
            object.__setattr__(self, "tools", tuple(self.tools))
        if not isinstance(self.add_generation_prompt, bool):
            raise InvalidArgumentError("must be a boolean", field="add_generation_prompt")
        kw = self.template_kwargs
        if not isinstance(kw, Mapping) or any(not isinstance(k, str) for k in kw):
            raise InvalidArgumentError("must be a dict of template variables", field="chat_template_kwargs")
        reserved = sorted(_RESERVED_TEMPLATE_VARIABLES.intersection(kw))
        if reserved:
            raise InvalidArgumentError(f"{reserved} are set from the request itself", field="chat_template_kwargs")


@dataclass(slots=True)
class TopLogprobs:
    """The top-k alternatives at one position, from the raw (unprocessed) logits."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass(slots=True)
class GenerateOutput:
    """The final result of one sample.

    Routed experts (``return_routed_experts``; MoE models): int16 arrays of expert ids, shape
    ``(rows, MoE layers, top_k)``, the layer axis running over the model's MoE layers in order
    (``ModelConfig.moe_layer_ids``), each row's ids ordered by router score, highest first. Row ``p``
    of ``concatenate([prompt_routed_experts, routed_experts])`` is the routing of the token at position
    ``p`` of prompt + output: ``P + n - 1`` rows for ``P`` prompt and ``n`` output tokens, since the
    last output token is never fed through the model (SGLang's and vLLM's convention). Split so that
    ``routed_experts[j]`` belongs to the forward that sampled ``output_ids[j]`` (the routing of the
    token before it): it lines up with ``output_logprobs[j]`` and ``weight_versions[j]``.
    ``prompt_routed_experts`` has the ``P - 1`` rows before (empty if the sample ended before its
    first token); rows of a prefix served from the prefix cache are the ones recorded with its KV.
    """

    request_id: str
    index: int  # which of the n samples of its prompt
    prompt_tokens: int
    output_ids: list[int]
    finish_reason: FinishReason
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    matched_stop: int | str | None = None  # the stop token id or stop string that ended it
    output_logprobs: list[float] | None = None  # under the distribution actually sampled from
    output_raw_logprobs: list[float] | None = None  # log-softmax of the raw logits
    output_top_logprobs: list[TopLogprobs] | None = None
    weight_versions: list[int] = field(default_factory=list)  # weight version of each token
    text: str | None = None  # decoded output when the model has a tokenizer
    routed_experts: np.ndarray | None = None  # (n, L, k) int16, one row per output token
    prompt_routed_experts: np.ndarray | None = None  # (P - 1, L, k) int16

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


@dataclass(slots=True)
class StreamChunk:
    """New tokens of one sample since its previous chunk; the last chunk has ``finished`` set.

    With ``return_routed_experts``, ``routed_experts`` has one row per token of the chunk and the
    sample's first chunk with a token (or its final chunk, if it has none) carries
    ``prompt_routed_experts`` (see ``GenerateOutput``).
    """

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    raw_logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    weight_versions: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    routed_experts: np.ndarray | None = None  # (len(token_ids), L, k) int16
    prompt_routed_experts: np.ndarray | None = None  # (P - 1, L, k) int16, once per sample
    # The text these tokens add to the sample's output, where the front end was asked to decode
    # (``rollout.detokenize``): never half a character; the deltas of a sample joined are its text.
    text: str | None = None


@dataclass(slots=True)
class EngineInfo:
    """A snapshot of the engine's state (GetInfo)."""

    model_path: str
    architecture: str
    context_length: int
    vocab_size: int
    weight_version: int
    weights_valid: bool
    paused: bool
    pause_mode: str | None
    num_waiting: int
    num_running: int
    num_paused: int
    kv_total_tokens: int
    kv_used_tokens: int  # held by requests
    kv_cached_tokens: int  # held by the prefix cache only (evictable)
    page_size: int
    num_retractions: int  # running requests sent back to the queue for lack of KV, since start
    device: str
    dtype: str
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # tag -> {state, bytes}
    version: str = ""
    tp_size: int = 1  # tensor-parallel ranks; a weight group needs tp_size members per engine
    rank_memory: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per rank (tp_size > 1)
    deterministic: bool = False  # batch-invariant kernels: a request's bits do not depend on the batch
    # Speculative decoding since start: drafts proposed, drafts accepted, and sequence-steps that
    # verified drafts (mean accepted length, tokens per target forward: 1 + accepted / verified).
    spec_drafted: int = 0
    spec_accepted: int = 0
    spec_verified: int = 0


@dataclass(frozen=True, slots=True)
class SwapResult:
    """The answer to a weight update in swap mode (``swap=True``).

    ``swapped``: the new weights were received beside generation and switched to between two steps.
    False: there was no room for the shadow copy, so the update took the pausing path (generation
    waited for the transfer); ``note`` says why.
    """

    weight_version: int
    swapped: bool
    note: str = ""
