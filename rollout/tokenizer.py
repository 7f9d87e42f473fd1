"""A thin wrapper over a ``tokenizers`` tokenizer.json, so the engine needs no transformers at run time.

``encode`` calls the tokenizer with ``add_special_tokens=True`` by default: special tokens are added
only when the tokenizer.json defines a post-processor that adds them (Llama 3 adds its BOS; Qwen and
the random test tokenizer add none). Special tokens written in the text (``<|im_start|>``) are
recognised as single tokens. A chat rendered with the model's template (``apply_chat_template``) is
encoded without added special tokens: the template writes them, as in transformers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from rollout.chat_template import ChatTemplate, token_content
from rollout.errors import InvalidArgumentError


class Tokenizer:
    """Text <-> token ids, plus the vocabulary size, EOS ids and chat template of a model directory."""

    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: tuple[int, ...] = (),
                 chat_template: ChatTemplate | None = None) -> None:
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template

    @classmethod
    def from_model_dir(cls, path: str) -> Tokenizer | None:
        """Load ``path/tokenizer.json``; None when the directory has none.

        EOS ids come from ``eos_token`` in ``tokenizer_config.json`` when that file exists; the chat
        template from ``chat_template.jinja`` or that file (see ``rollout.chat_template``).
        """
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            return None
        try:
            tok = HFTokenizer.from_file(tok_path)
        except Exception as err:  # the tokenizers library raises a bare Exception on bad files
            raise InvalidArgumentError(f"cannot read {tok_path}: {err}", field="tokenizer") from err
        eos: tuple[int, ...] = ()
        config: dict = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
            content = token_content(config.get("eos_token"))
            eos_id = tok.token_to_id(content) if content is not None else None
            eos = () if eos_id is None else (eos_id,)
        return cls(tok, eos, ChatTemplate.from_model_dir(path, config))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens only where the post-processor adds them, if asked)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text of a conversation, rendered with the model's chat template (``kwargs`` are
        extra template variables); ``InvalidArgumentError`` when the model has no template."""
        if self.chat_template is None:
            raise InvalidArgumentError(
                "the model has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json); "
                "send text or token ids", field="messages")
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids outside the tokenizer's vocabulary (a model's padded vocabulary rows
        can be sampled) decode to nothing."""
        size = self.vocab_size
        return self._tok.decode([i for i in ids if 0 <= i < size], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None]:
        """A function that takes one sample's ids in order and returns the text each adds, or None while
        the bytes of a character are still incomplete (the tokenizers library's ``DecodeStream``)."""
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        size = self.vocab_size

        def step(token_id: int) -> str | None:
            # Ids past the tokenizer's vocabulary (padded rows of the model's) decode to nothing, as in decode.
            return stream.step(self._tok, token_id) if 0 <= token_id < size else None

        return step

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)
