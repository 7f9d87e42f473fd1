"""Chat templates: a conversation (OpenAI-style messages, optional tools) to prompt text, with the
model's own Jinja template, rendered the way Hugging Face transformers renders it.

Where the template comes from, in transformers' order: ``chat_template.jinja`` (and named ones in
``additional_chat_templates/``) beside the tokenizer, else ``chat_template`` in
``tokenizer_config.json`` (one string, or a list of ``{"name", "template"}``). Of several named
templates, "tool_use" is picked when tools are given and it exists, else "default".

The environment matches transformers' so the same template gives the same text: a sandboxed Jinja
environment (templates come with the model, but nothing in them may reach Python objects), blocks
trimmed, loop controls, ``tojson`` without HTML escaping, ``raise_exception`` and ``strftime_now``,
the tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) as variables, and a no-op
``{% generation %}`` block (transformers uses it to mask assistant tokens). The rendered text is
tokenized without adding special tokens: the template writes them itself.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rollout.errors import InvalidArgumentError, quoted

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# tokenizer_config.json keys handed to every template (transformers' named special tokens).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers tracks it for masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def token_content(token: object) -> str | None:
    """tokenizer_config.json writes a token as a string or as ``{"content": ...}``."""
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return None


class ChatTemplate:
    """The chat template(s) of one model, compiled on first use."""

    def __init__(self, templates: Mapping[str, str], special_tokens: Mapping[str, str] | None = None) -> None:
        """``templates``: name -> Jinja source ("default" for a single one); ``special_tokens``: variables
        every render gets (e.g. ``{"eos_token": "<|im_end|>"}``)."""
        if not templates:
            raise InvalidArgumentError("at least one template is needed", field="chat_template")
        self.templates = dict(templates)
        self.special_tokens = dict(special_tokens or {})
        self._env = _environment()
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_model_dir(cls, path: str, tokenizer_config: Mapping[str, Any] | None = None) -> ChatTemplate | None:
        """The templates of a model directory, or None when it has none."""
        config = dict(tokenizer_config or {})
        templates: dict[str, str] = {}
        single = os.path.join(path, TEMPLATE_FILE)
        if os.path.isfile(single):
            templates["default"] = _read(single)
        named_dir = os.path.join(path, TEMPLATE_DIR)
        if os.path.isdir(named_dir):
            for name in sorted(os.listdir(named_dir)):
                if name.endswith(".jinja"):
                    templates[name.removesuffix(".jinja")] = _read(os.path.join(named_dir, name))
        if not templates:  # files beside the tokenizer take priority over the config's entry
            entry = config.get("chat_template")
            if isinstance(entry, str):
                templates["default"] = entry
            elif isinstance(entry, list):
                templates = {t["name"]: t["template"] for t in entry
                             if isinstance(t, dict) and isinstance(t.get("name"), str)
                             and isinstance(t.get("template"), str)}
        if not templates:
            return None
        special = {k: v for k in SPECIAL_TOKEN_KEYS if (v := token_content(config.get(k))) is not None}
        return cls(templates, special)

    def _pick(self, has_tools: bool) -> str:
        if len(self.templates) == 1:
            return next(iter(self.templates))
        if has_tools and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise InvalidArgumentError(
            f"the model has several chat templates {sorted(self.templates)} and none named 'default'",
            field="chat_template")

    def _template(self, name: str) -> jinja2.Template:
        if name not in self._compiled:
            try:
                self._compiled[name] = self._env.from_string(self.templates[name])
            except jinja2.TemplateSyntaxError as e:
                raise InvalidArgumentError(f"the model's chat template {quoted(name)} does not compile: {e}",
                                           field="chat_template") from None
        return self._compiled[name]

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text of ``messages`` (``tools`` are handed to the template as JSON schemas;
        ``kwargs`` are extra template variables, e.g. ``enable_thinking=False``). A template that
        refuses the conversation (``raise_exception``) raises ``InvalidArgumentError``."""
        template = self._template(self._pick(bool(tools)))
        variables = {**self.special_tokens, **kwargs}
        try:
            return template.render(messages=list(messages), tools=None if tools is None else list(tools),
                                   documents=None, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise InvalidArgumentError(f"the chat template refused the conversation: {e}", field="messages") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            # A template that reads a field the messages lack, or messages of an unexpected shape.
            raise InvalidArgumentError(f"the chat template could not render the conversation ({type(e).__name__}: "
                                       f"{e})", field="messages") from None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
