"""The tokenizer wrapper over the random model's byte-level BPE tokenizer.json."""

from __future__ import annotations

import json
import os

from rollout.testing.random_model import write_random_model
from rollout.tokenizer import Tokenizer

TEXT = "Hello world! The answer is 42.\nNaïve café, 東京 <|im_start|>user\nhi<|im_end|>"


def test_round_trip_and_eos(tmp_path):
    path = write_random_model(str(tmp_path), "qwen3", vocab_size=400)
    tok = Tokenizer.from_model_dir(path)
    assert tok is not None
    ids = tok.encode(TEXT)
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert tok.decode(ids) == TEXT.replace("<|im_start|>", "").replace("<|im_end|>", "")
    # Special tokens in the text are single tokens; nothing is prepended or appended.
    assert tok.token_to_id("<|im_start|>") in ids and ids.count(tok.token_to_id("<|im_end|>")) == 1
    assert tok.decode(ids[:1], skip_special_tokens=False) == "H"
    assert len(tok.encode("the answer")) < len("the answer")  # merges were learned
    assert tok.vocab_size <= 400
    with open(os.path.join(path, "generation_config.json")) as f:
        assert tok.eos_token_ids == (json.load(f)["eos_token_id"],) == (tok.token_to_id("<|endoftext|>"),)
    # Ids of the model's vocabulary beyond the tokenizer's decode to nothing instead of failing.
    assert tok.decode([*tok.encode("ok"), 399]) == "ok"


def test_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = write_random_model(str(tmp_path), "llama")
    ours, hf = Tokenizer.from_model_dir(path), AutoTokenizer.from_pretrained(path)
    assert ours is not None
    assert ours.encode(TEXT) == hf(TEXT)["input_ids"]
    assert ours.eos_token_ids == (hf.eos_token_id,)


def test_no_tokenizer_json_gives_none(tmp_path):
    assert Tokenizer.from_model_dir(str(tmp_path)) is None
