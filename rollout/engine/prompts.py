"""The prompts of one in-process call: token ids, text, or chats, one or a batch, with their sampling
parameters and request ids, checked and turned into ``AddRequest`` messages.

``Engine`` calls ``build_requests``; every check raises a typed error naming the argument at fault.
"""

from __future__ import annotations

import numbers
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from rollout.engine.messages import AddRequest
from rollout.engine.request_validation import make_add_request
from rollout.errors import InvalidArgumentError
from rollout.types import ChatPrompt, SamplingParams, as_sampling_params

if TYPE_CHECKING:
    from rollout.engine.request_validation import RequestLimits
    from rollout.tokenizer import Tokenizer

Prompts = Sequence[int] | Sequence[Sequence[int]] | None
Texts = str | Sequence[str] | None
Messages = Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]] | None
Sampling = SamplingParams | Mapping[str, Any] | None  # a dict is checked like SamplingParams.from_dict
Prompt = list[int] | str | ChatPrompt


@dataclass(frozen=True)
class PromptInputs:
    """What a caller passed: exactly one of ``input_ids``, ``text`` and ``messages`` (one prompt or a
    list of them); ``tools`` and ``chat_template_kwargs`` apply to every chat."""

    input_ids: Prompts = None
    text: Texts = None
    messages: Messages = None
    tools: Sequence[Mapping[str, Any]] | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None

    @classmethod
    def pop_from(cls, input_ids: Prompts, kwargs: dict[str, Any]) -> PromptInputs:
        """Take the prompt keywords out of ``kwargs`` (the rest are the call's other options)."""
        return cls(input_ids, kwargs.pop("text", None), kwargs.pop("messages", None), kwargs.pop("tools", None),
                   kwargs.pop("chat_template_kwargs", None))

    def prompts(self) -> list[Prompt]:
        """The prompts, in order; a single prompt is a batch of one."""
        given = [name for name in ("input_ids", "text", "messages") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidArgumentError(f"give one of input_ids, text and messages (got {given})", field=given[1])
        if (self.tools is not None or self.chat_template_kwargs is not None) and self.messages is None:
            raise InvalidArgumentError("tools and chat_template_kwargs go with messages", field="tools")
        prompts: list[Prompt]
        if self.messages is not None:
            prompts = [ChatPrompt(conv, self.tools, template_kwargs=self.chat_template_kwargs or {})
                       for conv in _conversations(self.messages)]
        elif self.text is not None:
            prompts = [self.text] if isinstance(self.text, str) else list(self.text)
        elif self.input_ids is not None:
            # A numpy array or torch tensor of ids (1-D: one prompt, 2-D: a batch) as lists of ints.
            ids = self.input_ids.tolist() if hasattr(self.input_ids, "tolist") else self.input_ids
            batch = len(ids) > 0 and not isinstance(ids[0], numbers.Integral)
            prompts = [_ids(p) for p in ids] if batch else [_ids(ids)]
        else:
            raise InvalidArgumentError("a prompt is required: input_ids, text or messages", field="input_ids")
        if not prompts:
            raise InvalidArgumentError("no prompts given", field=given[0])
        return prompts


def _ids(prompt: Any) -> list[Any]:
    """A prompt's ids as a list, numpy integers as ``int`` (anything else is left for the request
    checks to refuse by name)."""
    prompt = prompt.tolist() if hasattr(prompt, "tolist") else prompt
    return [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t for t in prompt]


def _conversations(messages: Any) -> Iterator[Any]:
    """One conversation (a list of message dicts) or a batch of them (a list of such lists)."""
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
        yield from messages
    else:
        yield messages


def build_requests(
    inputs: PromptInputs,
    sampling_params: Sampling | Sequence[Sampling],
    request_id: str | Sequence[str] | None,
    limits: RequestLimits,
    tokenizer: Tokenizer | None,
    ids: Iterator[int],
    **options: Any,
) -> list[AddRequest]:
    """One validated ``AddRequest`` per prompt. ``sampling_params`` is one for all prompts or a list
    with one per prompt; ``ids`` numbers the generated request ids; ``options`` go to
    ``make_add_request`` (return_logprob, top_logprobs_num, stream, ...)."""
    prompts = inputs.prompts()
    if isinstance(sampling_params, (list, tuple)):  # one per prompt
        params = [as_sampling_params(p) for p in sampling_params]
        if len(params) != len(prompts):
            raise InvalidArgumentError(
                f"{len(params)} sampling params for {len(prompts)} prompts", field="sampling_params")
    else:  # one for all: SamplingParams, a dict or None
        params = [as_sampling_params(sampling_params)] * len(prompts)
    if request_id is None:
        base = uuid.uuid4().hex[:12]
        rids = [f"{base}-{next(ids)}" for _ in prompts]
    else:
        rids = [request_id] if isinstance(request_id, str) else list(request_id)
        if len(rids) != len(prompts):
            raise InvalidArgumentError("one request id per prompt", field="request_id")
    return [
        make_add_request(
            rid,
            input_ids=p if isinstance(p, list) else None,
            text=p if isinstance(p, str) else None,
            chat=p if isinstance(p, ChatPrompt) else None,
            sampling=sp,
            limits=limits,
            tokenizer=tokenizer,
            **options,
        )
        for rid, p, sp in zip(rids, prompts, params)
    ]
