"""The chat template written with the random models: ChatML turns, with tools and tool calls.

Shape of a rendered conversation (``<|im_start|>`` / ``<|im_end|>`` are special tokens of the
random tokenizer)::

    <|im_start|>system
    {system text}
    Tools you may call, one JSON schema each:
    {"type": "function", "function": {...}}
    Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>
    <|im_start|>user
    {text}<|im_end|>
    <|im_start|>assistant
    <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><|im_end|>
    <|im_start|>tool
    <tool_response>
    {result}
    </tool_response><|im_end|>
    <|im_start|>assistant

It uses what real templates use (loop controls, ``tojson``, ``raise_exception``), so tests that
compare it with transformers' rendering exercise the same features.
"""

from __future__ import annotations

CHATML_TOOLS_TEMPLATE = """\
{%- set first_is_system = messages and messages[0].role == 'system' %}
{%- if tools or first_is_system %}
<|im_start|>system
{% if first_is_system %}{{ messages[0].content }}{% if tools %}{{ '\n' }}{% endif %}{% endif %}
{% if tools %}
Tools you may call, one JSON schema each:
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
{%- endif %}
<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if loop.first and first_is_system %}{% continue %}{% endif %}
{%- if message.role not in ('user', 'assistant', 'tool', 'system') %}
{{- raise_exception('unknown role ' ~ message.role) }}
{%- endif %}
<|im_start|>{{ message.role }}
{% if message.role == 'tool' %}
<tool_response>
{{ message.content }}
</tool_response>
{%- else %}
{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{% if not loop.first or message.content %}

{% endif %}
<tool_call>{"name": {{ fn.name | tojson }}, "arguments": \
{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}</tool_call>
{%- endfor %}
{%- endif %}
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
