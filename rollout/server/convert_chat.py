"""Chat prompts on the wire: ``ChatPrompt`` <-> the JSON fields of ``GenerateRequest``.

Messages and tools travel as JSON text (``messages_json``, ``tools_json``,
``chat_template_kwargs_json``) so that every field a template reads reaches it unchanged; they are
parsed here, at the edge, and checked by ``ChatPrompt``.
"""

from __future__ import annotations

import json
from typing import Any

from protos import rollout_pb2 as pb
from rollout.errors import InvalidArgumentError
from rollout.types import ChatPrompt


def _loads(text: str, field: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidArgumentError(f"is not valid JSON ({e})", field=field) from None
    if not isinstance(value, kind):
        raise InvalidArgumentError(f"must be a JSON {'array' if kind is list else 'object'}", field=field)
    return value


def _dumps(value: Any, field: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"must hold JSON values only ({e})", field=field) from None


def chat_from_proto(msg: pb.GenerateRequest) -> ChatPrompt | None:
    """The conversation of a request, or None when it has none (tools without messages are refused)."""
    if not msg.messages_json:
        if msg.tools_json or msg.chat_template_kwargs_json or msg.HasField("add_generation_prompt"):
            raise InvalidArgumentError("tools, template variables and add_generation_prompt go with messages_json",
                                       field="messages_json")
        return None
    messages = _loads(msg.messages_json, "messages_json", list)
    tools = _loads(msg.tools_json, "tools_json", list) if msg.tools_json else None
    kwargs = _loads(msg.chat_template_kwargs_json, "chat_template_kwargs_json", dict) \
        if msg.chat_template_kwargs_json else {}
    add = msg.add_generation_prompt if msg.HasField("add_generation_prompt") else True
    return ChatPrompt(messages, tools, add, kwargs)


def chat_to_proto(chat: ChatPrompt, msg: pb.GenerateRequest) -> None:
    """Write ``chat`` into the JSON fields of ``msg``."""
    msg.messages_json = _dumps(list(chat.messages), "messages")
    if chat.tools is not None:
        msg.tools_json = _dumps(list(chat.tools), "tools")
    if chat.template_kwargs:
        msg.chat_template_kwargs_json = _dumps(dict(chat.template_kwargs), "chat_template_kwargs")
    if not chat.add_generation_prompt:
        msg.add_generation_prompt = False
