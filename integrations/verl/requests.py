"""verl's generate call in our terms and back: sampling options in, ``TokenOutput`` fields out.

verl's agent loop sends vLLM/SGLang-style sampling dicts (``temperature``, ``top_p``, ``top_k``,
``repetition_penalty``, ``logprobs``, optionally ``max_tokens``); the server answers with the
fields of ``TokenOutput``. Everything here is plain data, so it is tested without Ray or verl.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout.errors import InvalidArgumentError, UnimplementedError, quoted
from rollout.types import FinishReason, GenerateOutput

# verl's key -> ours, for the options both engines have.
_RENAMED = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "seed": "seed",
    "min_tokens": "min_new_tokens",
    "min_new_tokens": "min_new_tokens",
}
# Detokenizer switches of vLLM / SGLang: they only shape text, and this server returns token ids.
_TEXT_ONLY = frozenset({"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"})
_LENGTH_KEYS = ("max_new_tokens", "max_tokens")  # SGLang's name first, as SGLang's server reads it
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


@dataclass(frozen=True)
class LengthBudget:
    """What bounds a response: verl's configured lengths and the engine's context."""

    prompt_length: int  # rollout.prompt_length
    response_length: int  # rollout.response_length
    context_length: int  # the longest sequence the engine serves


@dataclass(frozen=True)
class GenerateCall:
    """One verl generate request in our terms: ``max_new_tokens`` 0 means nothing may be generated."""

    sampling: dict[str, Any]
    max_new_tokens: int
    return_logprob: bool
    raw_logprobs: bool = False
    ignored: tuple[str, ...] = field(default=())


def to_generate_call(prompt_len: int, sampling_params: Mapping[str, Any], budget: LengthBudget,
                     logprobs_mode: str = "processed_logprobs") -> GenerateCall:
    """Convert verl's ``sampling_params`` for a prompt of ``prompt_len`` tokens.

    The response length follows SGLang's server in verl: an explicit ``max_new_tokens`` /
    ``max_tokens`` wins, otherwise ``min(response_length, prompt_length + response_length -
    prompt_len)``; either is clamped to what the context leaves. Options this engine lacks raise
    ``UnimplementedError`` naming them, unknown ones ``InvalidArgumentError``.
    """
    if logprobs_mode not in LOGPROBS_MODES:
        raise InvalidArgumentError(f"must be one of {list(LOGPROBS_MODES)}, got {quoted(logprobs_mode)}",
                                   field="logprobs_mode")
    sampling: dict[str, Any] = {}
    return_logprob = False
    explicit_length: int | None = None
    ignored = []
    for key, value in sampling_params.items():
        if key in _RENAMED:
            sampling[_RENAMED[key]] = value
        elif key in _LENGTH_KEYS:
            if explicit_length is None:
                explicit_length = _int(key, value)
        elif key == "logprobs":
            # verl passes a bool; a vLLM-style count asks for the sampled token's logprob too.
            return_logprob = bool(value)
        elif key == "repetition_penalty":
            if value is not None and float(value) != 1.0:
                raise UnimplementedError("repetition penalty is not supported; use 1.0", field=key)
        elif key == "prompt_logprobs":
            if value is not None:
                raise UnimplementedError("prompt logprobs are not returned by this engine", field=key)
        elif key == "n":
            if _int(key, value) != 1:
                raise UnimplementedError("verl repeats prompts for several samples; send n=1", field=key)
        elif key in _TEXT_ONLY:
            ignored.append(key)
        else:
            raise InvalidArgumentError("unknown sampling option", field=key)
    default = min(budget.response_length, budget.prompt_length + budget.response_length - prompt_len)
    wanted = default if explicit_length is None else explicit_length
    max_new = max(0, min(wanted, budget.context_length - prompt_len))
    if max_new > 0:
        sampling["max_new_tokens"] = max_new
    return GenerateCall(sampling, max_new, return_logprob, logprobs_mode == "raw_logprobs", tuple(ignored))


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"must be an integer, got {quoted(value)}", field=key)
    return value


def stop_reason(finish: FinishReason) -> str:
    """verl's ``TokenOutput.stop_reason``: 'aborted' for an abort, 'completed' for a stop or the length."""
    return "aborted" if finish == FinishReason.ABORT else "completed"


@dataclass(frozen=True)
class TokenFields:
    """The fields of verl's ``TokenOutput`` for one finished sample."""

    token_ids: list[int]
    log_probs: list[float] | None
    stop_reason: str
    extra_fields: dict[str, Any]


def token_fields(out: GenerateOutput, call: GenerateCall, current_version: int | None) -> TokenFields:
    """``TokenOutput`` fields of ``out``.

    ``extra_fields`` carries what verl reads (``global_steps``, ``min_global_steps``,
    ``max_global_steps``, ``num_cached_tokens``) plus the per-token ``weight_versions`` and our
    ``finish_reason`` ("stop" / "length" / "abort"). The global steps are the weight versions of the
    tokens, which follow verl's steps because each update is pushed with its step as the version;
    a sample without tokens reports the engine's ``current_version``.
    """
    versions = list(out.weight_versions)
    log_probs = None
    if call.return_logprob:
        log_probs = list(out.output_raw_logprobs if call.raw_logprobs else out.output_logprobs or [])
    extra = {
        "global_steps": versions[-1] if versions else current_version,
        "min_global_steps": min(versions) if versions else current_version,
        "max_global_steps": max(versions) if versions else current_version,
        "num_cached_tokens": out.cached_tokens,
        "weight_versions": versions,
        "finish_reason": FinishReason(out.finish_reason).value,
    }
    return TokenFields(list(out.output_ids), log_probs, stop_reason(out.finish_reason), extra)


def empty_fields(call: GenerateCall, current_version: int | None) -> TokenFields:
    """Fields for a request that may not generate anything (no room left in its length budget)."""
    extra = {
        "global_steps": current_version,
        "min_global_steps": current_version,
        "max_global_steps": current_version,
        "num_cached_tokens": 0,
        "weight_versions": [],
        "finish_reason": FinishReason.LENGTH.value,
    }
    return TokenFields([], [] if call.return_logprob else None, "completed", extra)


def check_prompt(prompt_ids: Sequence[int], context_length: int) -> list[int]:
    """``prompt_ids`` as a list of ints, refused when empty or too long for the context."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise InvalidArgumentError("the prompt is empty", field="prompt_ids")
    if len(ids) >= context_length:
        raise InvalidArgumentError(
            f"{len(ids)} tokens leave no room in the context of {context_length}", field="prompt_ids")
    return ids
