"""The replica routing rule and the replica server config (pure Python; no Ray needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from integrations.ray.routing import PrefixAffinityPolicy
from integrations.ray.server_process import RolloutServerConfig
from rollout.errors import InvalidArgumentError
from tests.waiting import process_running

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_new_prompts_go_to_the_least_loaded_replica():
    policy = PrefixAffinityPolicy(3)
    picks = [policy.choose([i, 1, 2], 8) for i in range(3)]
    assert sorted(picks) == [0, 1, 2]
    assert policy.outstanding == (8, 8, 8)
    policy.finished(picks[1], 8)
    assert policy.choose([99, 1, 2], 4) == picks[1]


def test_a_prompt_sticks_to_its_replica_within_the_slack():
    policy = PrefixAffinityPolicy(2, balance_slack=16)
    home = policy.choose([5, 6, 7], 8)
    other = 1 - home
    # Two more requests of the same prompt pile up at home while the other replica is idle: 16 over.
    assert policy.choose([5, 6, 7], 8) == home
    assert policy.outstanding[home] == 16 and policy.outstanding[other] == 0
    assert policy.choose([5, 6, 7], 8) == home
    # Now home is 24 ahead, past the slack: the next one goes to the idle replica, which becomes home.
    assert policy.choose([5, 6, 7], 8) == other
    assert policy.replica_of([5, 6, 7]) == other
    assert policy.routed[home] == 3 and policy.routed[other] == 1


def test_the_key_is_the_prefix():
    policy = PrefixAffinityPolicy(4, prefix_tokens=4)
    assert policy.key([1, 2, 3, 4, 5]) == policy.key([1, 2, 3, 4, 9, 9])
    assert policy.key([1, 2, 3, 4]) != policy.key([1, 2, 3, 5])
    assert policy.key("abcdefghijklmnop-x") == policy.key("abcdefghijklmnop-y")
    assert policy.key("abc") != policy.key([97, 98, 99])
    first = policy.choose([1, 2, 3, 4, 5], 1)
    assert policy.choose([1, 2, 3, 4, 6], 1) == first


def test_equal_loads_do_not_depend_on_replica_order():
    # Ties are broken by the key, so a prompt's first replica is a function of the prompt.
    picks = {PrefixAffinityPolicy(4).choose([7, 7, i], 1) for i in range(40)}
    assert picks == {0, 1, 2, 3}
    assert PrefixAffinityPolicy(4).choose([7, 7, 3], 1) == PrefixAffinityPolicy(4).choose([7, 7, 3], 1)


def test_the_table_forgets_the_least_recent_prompt():
    policy = PrefixAffinityPolicy(2, table_size=2)
    policy.choose([1], 1)
    policy.choose([2], 1)
    policy.choose([1], 1)  # [1] is now the most recent
    policy.choose([3], 1)
    assert policy.replica_of([2]) is None
    assert policy.replica_of([1]) is not None and policy.replica_of([3]) is not None


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_replicas=0), "num_replicas"),
    (dict(num_replicas=2, prefix_tokens=0), "prefix_tokens"),
    (dict(num_replicas=2, balance_slack=-1), "balance_slack"),
    (dict(num_replicas=2, table_size=0), "table_size"),
])
def test_bad_policy_options_are_refused_by_name(kwargs, field):
    with pytest.raises(InvalidArgumentError, match=field):
        PrefixAffinityPolicy(**kwargs)
    with pytest.raises(InvalidArgumentError, match="samples"):
        PrefixAffinityPolicy(1).choose([1], 0)


def test_server_config_builds_the_serve_command_and_refuses_bad_values():
    cmd = RolloutServerConfig("/m", device="cuda", dtype="bfloat16", max_total_tokens=4096,
                              extra_args=["--page-size", "16"]).command()
    assert cmd[1:4] == ["-m", "rollout", "serve"]
    assert cmd[cmd.index("--port") + 1] == "0" and cmd[cmd.index("--device") + 1] == "cuda"
    assert cmd[-2:] == ["--page-size", "16"] and "--max-total-tokens" in cmd
    for kwargs, field in ((dict(device="tpu"), "device"), (dict(dtype="int8"), "dtype"),
                          (dict(max_total_tokens=0), "max_total_tokens"), (dict(start_timeout_s=0), "start_timeout_s")):
        with pytest.raises(InvalidArgumentError, match=field):
            RolloutServerConfig("/m", **kwargs)


def test_server_process_dies_with_its_parent(tiny_model_dir, tmp_path):
    # A parent that starts a server and is then killed outright, as ``ray.kill`` ends an actor.
    code = ("import sys, time\n"
            "from integrations.ray.server_process import RolloutServerConfig, ServerProcess\n"
            f"s = ServerProcess(RolloutServerConfig({tiny_model_dir('qwen3')!r}, log_dir={str(tmp_path)!r}))\n"
            "print(s.proc.pid, flush=True)\n"
            "time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))}
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    server_pid = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while process_running(server_pid):
            assert time.monotonic() < deadline, "the server outlived its parent"
            time.sleep(0.1)
    finally:
        if process_running(server_pid):
            os.kill(server_pid, signal.SIGKILL)


