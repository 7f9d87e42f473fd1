"""Chat templates render exactly as transformers' ``apply_chat_template`` does, and reach the engine."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rollout.errors import InvalidArgumentError
from rollout.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers <a> & <b>",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 1+2? Answer in 日本語 🙂"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
        {"id": "c2", "type": "function", "function": {"name": "add", "arguments": {"a": 0, "b": 3}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "3"},
    {"role": "assistant", "content": "It is 3."},
    {"role": "user", "content": "And 2+2?"},
]
# Uses what transformers' environment adds: special-token variables, loop controls, the generation
# block, a tojson with options, and raise_exception.
FEATURES_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}"
    "{% endif %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
    "{% if m.role == 'assistant' %}{% generation %}[A]{{ m.content }}{{ eos_token }}{% endgeneration %}"
    "{% else %}[{{ m.role | upper }}]{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if tools %}{{ tools | tojson(indent=2, sort_keys=True) }}{% endif %}"
    "{% if add_generation_prompt %}[A]{% endif %}{% if flavour is defined %}<{{ flavour }}>{% endif %}"
)


def _hf(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _hf_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


@pytest.mark.parametrize("conversation, kw", [
    (CONVERSATION, dict(tools=TOOLS, add_generation_prompt=True)),
    (CONVERSATION, dict(add_generation_prompt=False)),
    (CONVERSATION[1:2], dict(add_generation_prompt=True)),
    (CONVERSATION[:2], dict(tools=TOOLS, add_generation_prompt=True)),
])
def test_the_test_models_template_matches_transformers(tiny_model_dir, conversation, kw) -> None:
    path = tiny_model_dir("qwen3")
    ours, hf = Tokenizer.from_model_dir(path), _hf(path)
    text = ours.apply_chat_template(conversation, **kw)
    assert text == hf.apply_chat_template(conversation, tokenize=False, **kw)
    assert ours.encode(text, add_special_tokens=False) == _hf_ids(hf, conversation, **kw)
    assert "<|im_start|>" in text and ('<tool_call>{"name": "add"' in text) == (conversation is CONVERSATION)


def _model_with(tmp_path, src: str, *, config_template: str | None, jinja: str | None = None,
                named: dict[str, str] | None = None, special: dict | None = None) -> str:
    path = str(tmp_path / "model")
    shutil.copytree(src, path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("chat_template", None)
    if config_template is not None:
        cfg["chat_template"] = config_template
    cfg.update(special or {})
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    if jinja is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(jinja)
    for name, source in (named or {}).items():
        os.makedirs(os.path.join(path, "additional_chat_templates"), exist_ok=True)
        with open(os.path.join(path, "additional_chat_templates", f"{name}.jinja"), "w") as f:
            f.write(source)
    return path


def test_template_features_and_file_priority_match_transformers(tmp_path, tiny_model_dir) -> None:
    # The .jinja file wins over the config's entry; special tokens from the config are variables.
    path = _model_with(tmp_path, tiny_model_dir("qwen3"), config_template="IGNORED", jinja=FEATURES_TEMPLATE,
                       special={"bos_token": "<|im_start|>", "eos_token": {
                           "__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}})
    ours, hf = Tokenizer.from_model_dir(path), _hf(path)
    messages = [{"role": "user", "content": "hi"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}]
    for kw in (dict(tools=TOOLS, add_generation_prompt=True), dict(flavour="salty", add_generation_prompt=False)):
        text = ours.apply_chat_template(messages, **kw)
        assert text == hf.apply_chat_template(messages, tokenize=False, **kw)
        assert ours.encode(text, add_special_tokens=False) == _hf_ids(hf, messages, **kw)
    assert "IGNORED" not in text and "<|im_end|>" in text
    with pytest.raises(InvalidArgumentError, match="no bad roles") as info:
        ours.apply_chat_template([{"role": "bad", "content": "x"}])
    assert info.value.field == "messages"


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path, tiny_model_dir) -> None:
    path = _model_with(tmp_path, tiny_model_dir("qwen3"), config_template=None,
                       named={"default": "PLAIN{{ messages[0].content }}", "tool_use": "TOOLS{{ tools | length }}"})
    ours, hf = Tokenizer.from_model_dir(path), _hf(path)
    messages = [{"role": "user", "content": "hi"}]
    for kw in ({"add_generation_prompt": True}, {"tools": TOOLS, "add_generation_prompt": True}):
        assert ours.apply_chat_template(messages, **kw) == hf.apply_chat_template(messages, tokenize=False, **kw)
    assert ours.apply_chat_template(messages, tools=TOOLS) == "TOOLS1"


def test_a_model_without_a_template_says_so(tmp_path, tiny_model_dir) -> None:
    path = _model_with(tmp_path, tiny_model_dir("qwen3"), config_template=None)
    tok = Tokenizer.from_model_dir(path)
    assert tok.chat_template is None
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_engine_generates_from_messages_as_from_the_templated_ids(tiny_model_dir) -> None:
    from rollout import Engine

    path = tiny_model_dir("qwen3")
    hf_ids = _hf_ids(_hf(path), CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    greedy = {"temperature": 0.0, "max_new_tokens": 4}
    with Engine(path) as engine:
        chat = engine.generate(messages=CONVERSATION, tools=TOOLS, sampling_params=greedy)[0]
        ids = engine.generate(input_ids=hf_ids, sampling_params=greedy)[0]
        assert chat.prompt_tokens == len(hf_ids)
        assert chat.output_ids == ids.output_ids
        # A batch of conversations, and a stream of one.
        two = engine.generate(messages=[CONVERSATION[1:2], CONVERSATION[1:2]], sampling_params=greedy)
        assert len(two) == 2 and two[0].output_ids == two[1].output_ids
        streamed = [t for c in engine.stream(messages=CONVERSATION[1:2], sampling_params=greedy) for t in c.token_ids]
        assert streamed == two[0].output_ids
        with pytest.raises(InvalidArgumentError) as info:
            engine.generate(messages=[{"content": "no role"}])
        assert info.value.field == "messages"
        with pytest.raises(InvalidArgumentError, match="one of input_ids, text and messages"):
            engine.generate(text="hi", messages=CONVERSATION)
        with pytest.raises(InvalidArgumentError, match="set from the request"):
            engine.generate(messages=CONVERSATION, chat_template_kwargs={"tools": []})
