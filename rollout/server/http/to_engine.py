"""OpenAI request bodies -> engine requests: sampling parameters, prompts and chats, checked here.

Every refusal is a typed error naming the field (OpenAI's name for it, see ``errors.OPENAI_PARAM``).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rollout.engine.request_validation import chat_prompt_ids, check_prompt_size, make_add_request
from rollout.errors import InvalidArgumentError, OutOfRangeError, quoted
from rollout.server.http.schemas import UNSUPPORTED, ChatCompletionRequest, CompletionRequest
from rollout.types import ChatPrompt, SamplingParams

if TYPE_CHECKING:
    from rollout.engine.client import EngineClient
    from rollout.engine.messages import AddRequest

logger = logging.getLogger(__name__)

# Choices (prompts x n) one completion request may ask for.
MAX_CHOICES = 4096


@dataclass(frozen=True)
class EngineCall:
    """The engine requests of one HTTP request: one per prompt, each with ``n`` samples."""

    response_id: str
    adds: list[AddRequest]
    stops: tuple[str, ...]  # stop strings, cut from the returned text as OpenAI does

    @property
    def n(self) -> int:
        return self.adds[0].sampling.n


def check_fields(body: CompletionRequest | ChatCompletionRequest, warned: set[str]) -> None:
    """Refuse fields this engine cannot honour; log unknown ones (ignored, as vLLM does) once each,
    ``warned`` holding those already reported."""
    for name, neutral in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value not in neutral:
            raise InvalidArgumentError(f"is not supported by this server (got {quoted(value)})", field=name)
    extra = sorted(set(body.model_extra or ()) - warned)
    if extra:
        warned.update(extra)
        logger.warning("ignoring request fields this server does not know: %s", extra)


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_new_tokens: int) -> SamplingParams:
    """The engine's sampling parameters; fields left out keep the engine defaults."""
    kwargs: dict[str, Any] = {
        name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "min_p", "seed")
        if getattr(body, name) is not None
    }
    stop = body.stop
    return SamplingParams(
        max_new_tokens=max_new_tokens, min_new_tokens=body.min_tokens, n=body.n, ignore_eos=body.ignore_eos,
        stop=() if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop)),
        stop_token_ids=tuple(body.stop_token_ids or ()), **kwargs)


def completion_call(body: CompletionRequest, engine: EngineClient, warned: set[str]) -> EngineCall:
    """The engine requests of ``POST /v1/completions`` (one per prompt of a batch)."""
    check_fields(body, warned)
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], list):
        prompts = list(prompt)
    elif prompt and isinstance(prompt[0], str):
        prompts = list(prompt)
    else:
        prompts = [prompt]
    if len(prompts) * body.n > MAX_CHOICES:
        # Each choice is built on the server's event loop, which the gRPC service shares.
        raise InvalidArgumentError(f"at most {MAX_CHOICES} choices (prompts x n) per request, got "
                                   f"{len(prompts)} x {body.n}; split the batch", field="prompt")
    rid = f"cmpl-{uuid.uuid4().hex}"
    adds = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):  # tokenized once, here, so that a null max_tokens can fill the context
            if engine.tokenizer is None:
                raise InvalidArgumentError("the model has no tokenizer.json; send token ids", field="text")
            check_prompt_size(0, len(p), engine.limits)
            p = engine.tokenizer.encode(p)
        room = _room(engine, len(p), "prompt")
        sampling = sampling_params(body, body.max_tokens if body.max_tokens is not None else room)
        adds.append(make_add_request(rid if len(prompts) == 1 else f"{rid}-{i}", input_ids=p, text=None,
                                     sampling=sampling, limits=engine.limits, tokenizer=engine.tokenizer,
                                     return_logprob=body.logprobs is not None, top_logprobs_num=body.logprobs or 0))
    return EngineCall(rid, adds, adds[0].sampling.stop)


def _room(engine: EngineClient, prompt_tokens: int, field: str) -> int:
    """How many tokens a prompt of this length leaves in the context (the default of a null max_tokens)."""
    room = min(engine.limits.context_length, engine.limits.max_total_tokens) - prompt_tokens
    if room < 1:
        raise OutOfRangeError(f"the prompt has {prompt_tokens} tokens and leaves no room in the context "
                              f"({engine.limits.context_length} tokens)", field=field)
    return room


def _message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    """One chat message as templates expect it: text parts joined into one string (this engine reads
    text only), tool-call arguments as objects (the API sends them as JSON text)."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidArgumentError(f"message {i}: only text content parts are supported (got {quoted(kind)})",
                                           field="messages")
            texts.append(part["text"])
        out["content"] = "\n".join(texts)
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [_tool_call(c) for c in calls]
    return out


def _tool_call(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call  # not JSON: the template gets the text as it came
    return {**call, "function": {**fn, "arguments": args}} if isinstance(args, dict) else call


def chat_call(body: ChatCompletionRequest, engine: EngineClient, warned: set[str]) -> EngineCall:
    """The engine request of ``POST /v1/chat/completions``: the messages rendered with the model's
    chat template, ``tools`` handed to it."""
    check_fields(body, warned)
    if body.top_logprobs and not body.logprobs:
        raise InvalidArgumentError("needs logprobs: true", field="top_logprobs")
    chat = ChatPrompt([_message(i, m) for i, m in enumerate(body.messages)], body.tools,
                      body.add_generation_prompt, body.chat_template_kwargs or {})
    ids = chat_prompt_ids(chat, engine.tokenizer, engine.limits)
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = sampling_params(body, max_new if max_new is not None else _room(engine, len(ids), "messages"))
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    add = make_add_request(rid, input_ids=ids, text=None, sampling=sampling, limits=engine.limits,
                           tokenizer=engine.tokenizer, return_logprob=body.logprobs,
                           top_logprobs_num=body.top_logprobs or 0)
    return EngineCall(rid, [add], sampling.stop)
