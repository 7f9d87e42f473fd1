"""Engine options of the wrong type or out of what the model allows are refused at construction,
naming the option, instead of starting an engine that fails (or quietly means something else) on
its first request."""

from __future__ import annotations

import pytest

from rollout import Engine
from rollout.config import EngineConfig
from rollout.errors import InvalidArgumentError


@pytest.mark.parametrize("opts, field", [
    ({"chunked_prefill_size": 2.5}, "chunked_prefill_size"),
    ({"max_num_batched_tokens": 1.5}, "max_num_batched_tokens"),
    ({"speculative_method": "ngram", "ngram_min_match": 1.5}, "ngram_min_match"),
    ({"speculative_method": "ngram", "num_draft_tokens": "4"}, "num_draft_tokens"),
    ({"page_size": "4"}, "page_size"),
    ({"page_size": None}, "page_size"),
    ({"page_size": True}, "page_size"),
    ({"max_running_requests": 2.5}, "max_running_requests"),
    ({"max_total_tokens": 100.5}, "max_total_tokens"),
    ({"context_length": None}, "context_length"),
    ({"kv_memory_fraction": "0.5"}, "kv_memory_fraction"),
    ({"cuda_graph_max_bs": "8"}, "cuda_graph_max_bs"),
    ({"memory_backup_tags": None}, "memory_backup_tags"),
    ({"deterministic": "false"}, "deterministic"),
    ({"enable_prefix_cache": "false"}, "enable_prefix_cache"),
    ({"overlap_schedule": "false"}, "overlap_schedule"),
    ({"fp32_lm_head": "false"}, "fp32_lm_head"),
])
def test_an_option_of_the_wrong_type_is_refused(tiny_model_dir, opts, field) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        EngineConfig.build(tiny_model_dir("qwen3"), **opts)
    assert err.value.field == field


def test_a_context_past_the_models_positions_is_refused(tiny_model_dir) -> None:
    short = tiny_model_dir("qwen3", max_position_embeddings=32)
    with pytest.raises(InvalidArgumentError, match="at most 32 positions") as err:
        EngineConfig.build(short, context_length=64)
    assert err.value.field == "context_length"
    assert EngineConfig.build(short, context_length=32).context_length == 32
    window = tiny_model_dir("qwen2", sliding_window=16, use_sliding_window=True, max_window_layers=0)
    assert EngineConfig.build(window).context_length == 16  # sliding windows are not implemented: attend within
    with pytest.raises(InvalidArgumentError, match="sliding_window"):
        EngineConfig.build(window, context_length=64)


def test_the_draft_model_is_checked_as_the_draft_model(tiny_model_dir) -> None:
    target = tiny_model_dir("qwen3")
    with pytest.raises(InvalidArgumentError, match="no config.json") as err:
        Engine(target, speculative_method="draft", draft_model_path="/nonexistent", max_total_tokens=64)
    assert err.value.field == "draft_model_path"
    short = tiny_model_dir("qwen3", max_position_embeddings=32, seed=1)
    with pytest.raises(InvalidArgumentError, match="draft model attends over 32 positions") as err:
        Engine(target, speculative_method="draft", draft_model_path=short, max_total_tokens=128)
    assert err.value.field == "draft_model_path"
    with Engine(target, speculative_method="draft", draft_model_path=short, context_length=32,
                max_total_tokens=128) as engine:
        assert len(engine.generate([1, 2, 3], {"max_new_tokens": 4, "ignore_eos": True})[0].output_ids) == 4
