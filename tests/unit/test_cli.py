"""The ``rollout`` command line: argument checks and help."""

from __future__ import annotations

import pytest

from rollout.cli import main
from rollout.errors import InvalidArgumentError


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_a_port_outside_0_to_65535_is_a_usage_error(port, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", port, "--model", "/no/such/model"])
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("port", [99999, -1, 1.5, True])
def test_serve_refuses_a_bad_port_before_anything_starts(port) -> None:
    from rollout.server.app import serve

    with pytest.raises(InvalidArgumentError, match="port: must be an integer in 0..65535"):
        serve("/no/such/model", port=port)


def test_help_shows_the_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("--port PORT port to bind; 0 picks a free one (default: 50051)",
                  "(default: 127.0.0.1)", "(default: cpu)", "(default: float32)", "(default: 16384)",
                  "(default: 4096)", "(default: 256)", "(default: INFO)"):
        assert shown in text, text


def test_deterministic_flags_reach_the_engine_options() -> None:
    from rollout.cli import build_parser, engine_options

    args = build_parser().parse_args(["serve", "--model", "m", "--deterministic", "--fp32-lm-head"])
    assert engine_options(args) == {"deterministic": True, "fp32_lm_head": True}
    assert engine_options(build_parser().parse_args(["serve", "--model", "m"])) == {}


def test_expert_parallel_flags_reach_the_engine_options() -> None:
    from rollout.cli import build_parser, engine_options

    args = build_parser().parse_args(["serve", "--model", "m", "--ep-size", "2", "--ep-spare-slots", "1",
                                      "--ep-rebalance-interval", "50"])
    assert engine_options(args) == {"ep_size": 2, "ep_spare_slots": 1, "ep_rebalance_interval": 50}


def test_memory_backup_tags_reach_the_engine_options() -> None:
    from rollout.cli import build_parser, engine_options

    args = build_parser().parse_args(["serve", "--memory-backup-tags", "weights", "kv_cache"])
    assert engine_options(args) == {"memory_backup_tags": ["weights", "kv_cache"]}
