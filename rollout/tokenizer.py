"""A thin wrapper over a ``tokenizers`` tokenizer.json, so the engine needs no transformers at run time.

``encode`` calls the tokenizer with ``add_special_tokens=True``: special tokens are added only when
the tokenizer.json defines a post-processor that adds them (Llama 3 adds its BOS; Qwen and the
random test tokenizer add none). Special tokens written in the text (``<|im_start|>``) are
recognised as single tokens.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as HFTokenizer

from rollout.errors import InvalidArgumentError


def _token_content(token: object) -> str | None:
    """tokenizer_config.json writes a token as a string or as ``{"content": ...}``."""
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return None


class Tokenizer:
    """Text <-> token ids, plus the vocabulary size and EOS ids of a model directory."""

    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_model_dir(cls, path: str) -> Tokenizer | None:
        """Load ``path/tokenizer.json``; None when the directory has none.

        EOS ids come from ``eos_token`` in ``tokenizer_config.json`` when that file exists.
        """
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            return None
        try:
            tok = HFTokenizer.from_file(tok_path)
        except Exception as err:  # the tokenizers library raises a bare Exception on bad files
            raise InvalidArgumentError(f"cannot read {tok_path}: {err}", field="tokenizer") from err
        eos: tuple[int, ...] = ()
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                content = _token_content(json.load(f).get("eos_token"))
            eos_id = tok.token_to_id(content) if content is not None else None
            eos = () if eos_id is None else (eos_id,)
        return cls(tok, eos)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens only where the post-processor adds them)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids outside the tokenizer's vocabulary (a model's padded vocabulary rows
        can be sampled) decode to nothing."""
        size = self.vocab_size
        return self._tok.decode([i for i in ids if 0 <= i < size], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)
