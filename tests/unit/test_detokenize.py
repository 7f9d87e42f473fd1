"""Incremental detokenization: stream deltas never split a character and join to the full decode."""

from __future__ import annotations

import pytest

from rollout.detokenize import SampleText, TextDeltas
from rollout.tokenizer import Tokenizer
from rollout.types import StreamChunk

TEXT = "héllo 日本語 🙂 the fox 👩‍💻!"


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(tiny_model_dir("qwen3"))


def test_the_text_splits_characters_over_tokens(tok) -> None:
    # The premise of the tests below: decoding token by token gives replacement characters.
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_deltas_are_whole_characters_and_join_to_the_text(tok, chunk) -> None:
    ids = tok.encode(TEXT)
    sample = SampleText(tok)
    deltas = [sample.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(sample.finish())
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == TEXT == sample.text == tok.decode(ids)


def test_a_sample_that_ends_inside_a_character_ends_as_decode_does(tok) -> None:
    ids = tok.encode("ok 🙂")[:-1]  # the emoji's last byte never came
    sample = SampleText(tok)
    streamed = sample.push(ids)
    assert "\ufffd" not in streamed
    assert streamed + sample.finish() == tok.decode(ids)


def test_text_deltas_keep_samples_apart_and_skip_special_tokens(tok) -> None:
    a, b = tok.encode("日本"), tok.encode("🙂 fox")
    eos = tok.token_to_id("<|endoftext|>")
    deltas = TextDeltas(tok)
    chunks = [StreamChunk("r", 0, a[:2]), StreamChunk("r", 1, b[:3]), StreamChunk("r", 0, a[2:]),
              StreamChunk("r", 1, b[3:] + [eos], finished=True), StreamChunk("r", 0, [], finished=True)]
    for c in chunks:
        deltas.add(c)
    assert "".join(c.text for c in chunks if c.index == 0) == "日本"
    assert "".join(c.text for c in chunks if c.index == 1) == "🙂 fox"
