"""Engine chunks -> OpenAI response bodies, whole or as stream events.

Each choice (prompt ``i``, sample ``j`` -> index ``i * n + j``) keeps its decoded text (never half a
character, see ``rollout.detokenize``), cut at a matched stop string as OpenAI does; a stop token's
own text is left out. While stop strings are set, a stream holds back the last ``len(longest) - 1``
characters, since they could still become a stop string. Extra fields, so RL code loses nothing:
``token_ids`` and ``weight_versions`` (per token) on every choice and stream delta, ``prompt_token_ids``
(per choice for completions, per response for chats), ``matched_stop``, and ``usage.prompt_tokens_details
.cached_tokens``. Logprobs are those of the distribution the engine sampled from; the top
alternatives come from the raw logits.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rollout.detokenize import SampleText
from rollout.types import FinishReason, StreamChunk

if TYPE_CHECKING:
    from rollout.server.http.to_engine import EngineCall
    from rollout.tokenizer import Tokenizer


class Choice:
    """One sample's output as it builds up."""

    def __init__(self, index: int, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.index = index
        self._decoder = SampleText(tokenizer)
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self.sent = 0  # characters of the decoded text already handed out
        self.offset = 0  # the streamed logprobs' text_offset so far (their tokens' characters)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[Any] = []
        self.versions: list[int] = []
        self.last: StreamChunk | None = None  # the final chunk, once the sample ended

    def add(self, chunk: StreamChunk) -> str:
        """Take a chunk; returns the text it lets out."""
        ids = chunk.token_ids
        self.token_ids += ids
        self.versions += chunk.weight_versions
        self.logprobs += chunk.logprobs or []
        self.top += chunk.top_logprobs or []
        stop = chunk.matched_stop
        is_stop_id = isinstance(stop, int) and not isinstance(stop, bool)
        if chunk.finished and isinstance(stop, str) and ids:
            # The engine matched the stop in the last token's text (with the characters just before
            # it): the cut is that occurrence, not an earlier one the text may hold.
            self._decoder.push(ids[:-1])
            before = len(self._decoder.text)
            self._decoder.push(ids[-1:])
        else:
            self._decoder.push(ids[:-1] if chunk.finished and is_stop_id and ids and ids[-1] == stop else ids)
        if chunk.finished:
            self.last = chunk
            self._decoder.finish()
            text = self._decoder.text
            if isinstance(stop, str):
                cut = text.find(stop, max(0, before - len(stop) + 1)) if ids else -1
                if cut < 0:
                    cut = text.rfind(stop)
                if cut >= 0:
                    text = text[:cut]
            self.text = text
            delta, self.sent = text[self.sent:], len(text)
            return delta
        upto = len(self._decoder.text) - self._holdback
        if upto <= self.sent:
            return ""
        delta, self.sent = self._decoder.text[self.sent:upto], upto
        return delta

    @property
    def finish_reason(self) -> str | None:
        if self.last is None:
            return None
        return (self.last.finish_reason or FinishReason.ABORT).value


def _token(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, ids: list[int], logprobs: list[float], top: list[Any],
                        offset: int = 0) -> dict[str, Any]:
    """The ``logprobs`` object of a completion choice (legacy format); ``offset``: text before these tokens."""
    tokens = [_token(tokenizer, t) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": [{_token(tokenizer, t): lp for t, lp in zip(k.token_ids, k.logprobs)} for k in top]
        if top else None,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Tokenizer, ids: list[int], logprobs: list[float], top: list[Any]) -> dict[str, Any]:
    """The ``logprobs`` object of a chat choice: one entry per token, with its top alternatives."""

    def entry(token_id: int, lp: float) -> dict[str, Any]:
        text = _token(tokenizer, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = []
    for i, (t, lp) in enumerate(zip(ids, logprobs)):
        alts = [entry(a, alp) for a, alp in zip(top[i].token_ids, top[i].logprobs)] if i < len(top) else []
        content.append({**entry(t, lp), "top_logprobs": alts})
    return {"content": content}


def usage(call: EngineCall, choices: list[Choice]) -> dict[str, Any]:
    """Token counts: each prompt once, every choice's tokens, and the prompt tokens served from cache."""
    prompt = sum(len(a.input_ids) for a in call.adds)
    n = call.n
    cached = sum(min((c.last.cached_tokens if c.last else 0) for c in choices[i * n:(i + 1) * n])
                 for i in range(len(call.adds)))
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _extras(c: Choice) -> dict[str, Any]:
    return {"token_ids": c.token_ids, "weight_versions": c.versions,
            "matched_stop": c.last.matched_stop if c.last else None}


def completion_body(call: EngineCall, model: str, tokenizer: Tokenizer, choices: list[Choice],
                    want_logprobs: bool) -> dict[str, Any]:
    """The whole ``text_completion`` response."""
    out = []
    for c in choices:
        lp = completion_logprobs(tokenizer, c.token_ids, c.logprobs, c.top) if want_logprobs else None
        out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                    "prompt_token_ids": call.adds[c.index // call.n].input_ids, **_extras(c)})
    return {"id": call.response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage(call, choices)}


def chat_body(call: EngineCall, model: str, tokenizer: Tokenizer, choices: list[Choice],
              want_logprobs: bool) -> dict[str, Any]:
    """The whole ``chat.completion`` response."""
    out = []
    for c in choices:
        lp = chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top) if want_logprobs else None
        out.append({"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                    "finish_reason": c.finish_reason, **_extras(c)})
    return {"id": call.response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage(call, choices), "prompt_token_ids": call.adds[0].input_ids}


def stream_event(call: EngineCall, model: str, tokenizer: Tokenizer, choice: Choice, chunk: StreamChunk,
                 delta: str, chat: bool, want_logprobs: bool, first: bool) -> dict[str, Any]:
    """One stream event for ``chunk`` of ``choice`` (``delta``: the text it lets out; ``first``: the
    choice's first event, which carries the role and prompt ids)."""
    entry: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason if chunk.finished else None,
                             "token_ids": chunk.token_ids, "weight_versions": chunk.weight_versions}
    lp = None
    if want_logprobs and chunk.logprobs is not None:
        top = chunk.top_logprobs or []
        if chat:
            lp = chat_logprobs(tokenizer, chunk.token_ids, chunk.logprobs, top)
        else:  # offsets count the tokens' own text, as the whole response does (not the text let out)
            lp = completion_logprobs(tokenizer, chunk.token_ids, chunk.logprobs, top, choice.offset)
            choice.offset += sum(len(t) for t in lp["tokens"])
    entry["logprobs"] = lp
    if chunk.finished:
        entry["matched_stop"] = chunk.matched_stop
    if chat:
        entry["delta"] = {"role": "assistant", "content": delta} if first else {"content": delta}
    else:
        entry["text"] = delta
        if first:
            entry["prompt_token_ids"] = call.adds[choice.index // call.n].input_ids
    event = {"id": call.response_id, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": int(time.time()), "model": model, "choices": [entry]}
    if chat and first:
        event["prompt_token_ids"] = call.adds[0].input_ids
    return event


def usage_event(call: EngineCall, model: str, choices: list[Choice], chat: bool) -> dict[str, Any]:
    """The last event of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": call.response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(call, choices)}
