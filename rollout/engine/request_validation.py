"""Checks a generation request where it enters and turns it into an ``AddRequest``.

Every front end (in-process ``Engine``, gRPC servicer) calls ``make_add_request``; the engine loop
then only sees requests that can be served. Errors name the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from rollout.engine.messages import AddRequest
from rollout.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    OutOfRangeError,
    ResourceExhaustedError,
    quoted,
)
from rollout.types import ChatPrompt, SamplingParams

if TYPE_CHECKING:
    from rollout.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 64


@dataclass(frozen=True)
class RequestLimits:
    """What the engine can serve: token ids below ``vocab_size``, sequences up to
    ``context_length`` tokens, and at most ``max_total_tokens`` tokens of KV for one sequence;
    ``eos_token_ids`` are the model's EOS ids."""

    vocab_size: int
    context_length: int
    max_total_tokens: int
    eos_token_ids: tuple[int, ...] = ()  # masked with the stop ids until min_new_tokens (unless ignore_eos)
    num_moe_layers: int = 0  # 0: a dense model
    routed_experts: bool = False  # the engine records routed experts (enable_return_routed_experts)


MAX_TEXT_CHARS_PER_TOKEN = 64  # a text prompt longer than this per token of context cannot fit it


def check_prompt_size(num_ids: int, text_chars: int, limits: RequestLimits) -> None:
    """Refuse a prompt that cannot fit the context from its length alone (cheap, before any
    per-token work: a prompt of millions of ids must not hold the caller for seconds)."""
    if num_ids > limits.context_length:
        raise OutOfRangeError(
            f"the prompt has {num_ids} tokens; the context length is {limits.context_length}", field="input_ids")
    if text_chars > limits.context_length * MAX_TEXT_CHARS_PER_TOKEN:
        raise OutOfRangeError(
            f"the text prompt has {text_chars} characters, far more than a context of {limits.context_length} "
            "tokens holds", field="text")


def chat_prompt_ids(chat: ChatPrompt, tokenizer: Tokenizer | None, limits: RequestLimits) -> list[int]:
    """The token ids of a conversation: rendered with the model's chat template, then encoded without
    added special tokens (the template writes them)."""
    if tokenizer is None:
        raise InvalidArgumentError("the model has no tokenizer.json; send input_ids", field="messages")
    text = tokenizer.apply_chat_template(chat.messages, tools=chat.tools,
                                         add_generation_prompt=chat.add_generation_prompt, **chat.template_kwargs)
    check_prompt_size(0, len(text), limits)
    return tokenizer.encode(text, add_special_tokens=False)


def _check_ids(input_ids: Sequence[int], vocab_size: int) -> list[int]:
    ids: list[int] = []
    for i, t in enumerate(input_ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidArgumentError(f"token at index {i} is not an integer ({quoted(t)})", field="input_ids")
        if not 0 <= t < vocab_size:
            raise InvalidArgumentError(
                f"token id {t} at index {i} is outside the vocabulary [0, {vocab_size})", field="input_ids"
            )
        ids.append(int(t))
    return ids


def _check_min_new_tokens_drawable(sampling: SamplingParams, limits: RequestLimits) -> None:
    """Refuse a request whose stop ids (with EOS unless ignored) ban every token before min_new_tokens."""
    if sampling.min_new_tokens == 0:
        return
    banned = set(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        banned.update(t for t in limits.eos_token_ids if 0 <= t < limits.vocab_size)
    if len(banned) >= limits.vocab_size:
        which = "stop_token_ids" if sampling.ignore_eos else "stop_token_ids and the EOS ids"
        raise InvalidArgumentError(
            f"{which} cover the whole vocabulary ({limits.vocab_size} tokens), so no token can be drawn "
            f"before min_new_tokens ({sampling.min_new_tokens}); lower min_new_tokens or the stop ids",
            field="min_new_tokens",
        )


def make_add_request(
    request_id: str,
    *,
    input_ids: Sequence[int] | None,
    text: str | None,
    sampling: SamplingParams,
    limits: RequestLimits,
    tokenizer: Tokenizer | None,
    return_logprob: bool = False,
    return_raw_logprob: bool = False,
    top_logprobs_num: int = 0,
    stream: bool = True,
    return_routed_experts: bool = False,
    chat: ChatPrompt | None = None,
) -> AddRequest:
    """Validate one prompt (token ids, text, or a ``chat`` rendered with the model's chat template)
    and its options; raise a typed error naming the field at fault."""
    if not isinstance(request_id, str) or not request_id:
        raise InvalidArgumentError("must be a non-empty string", field="request_id")
    if sum((input_ids is not None and len(input_ids) > 0, bool(text), chat is not None)) > 1:
        raise InvalidArgumentError("give one of input_ids, text and messages", field="input_ids")
    check_prompt_size(len(input_ids) if input_ids is not None else 0, len(text) if text else 0, limits)
    if chat is not None:
        input_ids = chat_prompt_ids(chat, tokenizer, limits)
    elif text:
        if tokenizer is None:
            raise InvalidArgumentError("the model has no tokenizer.json; send input_ids", field="text")
        input_ids = tokenizer.encode(text)
    if input_ids is None or len(input_ids) == 0:
        raise InvalidArgumentError("the prompt is empty", field="input_ids")
    ids = _check_ids(input_ids, limits.vocab_size)
    for t in sampling.stop_token_ids:
        if t >= limits.vocab_size:
            raise InvalidArgumentError(f"token id {t} is outside the vocabulary", field="stop_token_ids")
    _check_min_new_tokens_drawable(sampling, limits)
    if sampling.stop and tokenizer is None:
        raise InvalidArgumentError("stop strings need a tokenizer.json", field="stop")
    if not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise InvalidArgumentError(f"must be in [0, {MAX_TOP_LOGPROBS}]", field="top_logprobs_num")
    if return_routed_experts:
        _check_routed_experts(limits)
    total = len(ids) + sampling.max_new_tokens
    if total > limits.context_length:
        raise OutOfRangeError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = {total} exceeds the "
            f"context length {limits.context_length}",
            field="max_new_tokens",
        )
    if total > limits.max_total_tokens:
        raise ResourceExhaustedError(
            f"prompt + max_new_tokens = {total} tokens exceeds the KV cache capacity "
            f"({limits.max_total_tokens} tokens); lower max_new_tokens or give the engine more KV memory",
            field="max_new_tokens",
        )
    return AddRequest(
        request_id=request_id,
        input_ids=ids,
        sampling=sampling,
        return_logprob=bool(return_logprob),
        return_raw_logprob=bool(return_raw_logprob),
        top_logprobs_num=int(top_logprobs_num),
        stream=stream,
        return_routed_experts=bool(return_routed_experts),
    )


def _check_routed_experts(limits: RequestLimits) -> None:
    """Refuse ``return_routed_experts`` on a dense model, or on an engine that does not record routing."""
    if limits.num_moe_layers == 0:
        raise InvalidArgumentError("the model has no MoE layers, so there are no routed experts to return",
                                   field="return_routed_experts")
    if not limits.routed_experts:
        raise FailedPreconditionError(
            "this engine does not record routed experts; start it with enable_return_routed_experts=True "
            "(rollout serve --enable-return-routed-experts)", field="return_routed_experts")
