"""No caller can wedge the server: callers that give up, joins that never complete, engines that stall.

Each test that could wedge a server gets its own, with a short engine-stall limit, so a wedge shows up
as a failure within seconds instead of a hang; requests refused up front use the shared server.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from protos import rollout_pb2 as pb
from protos import rollout_pb2_grpc
from rollout.client import RolloutClient
from rollout.errors import RolloutError
from rollout.types import SamplingParams
from weight_sync.group import CommGroup, GroupConfig, master_store

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
STALL_S = 2.0  # the servers' --engine-stall-timeout: health goes NOT_SERVING after this long unanswered


@pytest.fixture
def wedge_server(start_server, tiny_model):
    server = start_server("--model", tiny_model, "--engine-stall-timeout", str(STALL_S))
    yield server
    server.stop()


def _stub(address: str) -> tuple[grpc.Channel, rollout_pb2_grpc.RolloutStub]:
    channel = grpc.insecure_channel(address)
    return channel, rollout_pb2_grpc.RolloutStub(channel)


def _assert_serves(client: RolloutClient, within_s: float = 5.0) -> None:
    """GetInfo and a short Generate both answer within ``within_s`` seconds."""
    start = time.monotonic()
    info = client.get_info()
    [out] = client.generate([1, 2, 3], GREEDY)
    took = time.monotonic() - start
    assert len(out.output_ids) == 4, f"the server generated {out.output_ids} for a 4-token request"
    assert took < within_s, f"the server took {took:.1f} s to answer GetInfo and a 4-token Generate"
    assert not info.paused


def test_a_control_call_whose_caller_gives_up_does_not_wedge_the_server(wedge_server):
    channel, stub = _stub(wedge_server.address)
    with channel, RolloutClient(wedge_server.address, timeout=10) as client:
        # A master that never answers (nothing listens on port 1), and a client that stops waiting first.
        req = pb.InitWeightUpdateGroupRequest(master_address="127.0.0.1", master_port=1, rank_offset=1,
                                              world_size=2, group_name="never", backend="gloo", timeout_s=3)
        with pytest.raises(grpc.RpcError) as err:
            stub.InitWeightUpdateGroup(req, timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # GetInfo calls whose deadline passes while they wait for the engine.
        for _ in range(20):
            try:
                stub.GetInfo(pb.GetInfoRequest(), timeout=0.001)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _assert_serves(client)
        assert client.health(), "health is not SERVING although the engine answers"
        time.sleep(3.5)  # the join gave up by now; its late reply must not break anything either
        _assert_serves(client)
    assert wedge_server.stop(timeout=10) == 0


def test_a_pending_join_does_not_stall_generation_and_reports_its_failure(wedge_server):
    with RolloutClient(wedge_server.address, timeout=30) as client:
        store = master_store("127.0.0.1", None, 2, 30)  # a trainer that hosts the store but never joins
        failure: list[BaseException] = []

        def join() -> None:
            try:
                client.init_weight_update_group("127.0.0.1", store.port, 1, 2, "late", "gloo", timeout_s=4)
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
                failure.append(e)

        joiner = threading.Thread(target=join)
        joiner.start()
        time.sleep(0.5)
        _assert_serves(client, within_s=2.0)
        joiner.join(timeout=20)
        assert not joiner.is_alive(), "InitWeightUpdateGroup did not return after its timeout"
        assert failure and isinstance(failure[0], RolloutError), f"the join did not fail: {failure}"
        assert failure[0].code == "FAILED_PRECONDITION" and "did not form" in str(failure[0])
        _assert_serves(client)
        # The failed join left nothing behind: the same name can be used again (with a new trainer store:
        # the old one still holds the first attempt's rendezvous keys).
        store = master_store("127.0.0.1", None, 2, 30)
        trainer: list[CommGroup] = []
        t = threading.Thread(target=lambda: trainer.append(CommGroup.join(
            GroupConfig("127.0.0.1", store.port, 0, 2, "late", "gloo", 30), "cpu", store)))
        t.start()
        assert client.init_weight_update_group("127.0.0.1", store.port, 1, 2, "late", "gloo", timeout_s=30) == "late"
        t.join(timeout=30)
        assert trainer, "the trainer side did not form the group"
        assert client.destroy_weight_update_group("late") == "late"
        trainer[0].close()


@pytest.mark.parametrize("timeout_s", [-1.0, 1e9, float("nan")])
def test_a_join_with_an_absurd_timeout_is_refused(server, token, timeout_s):
    channel, stub = _stub(server.address)
    with channel:
        req = pb.InitWeightUpdateGroupRequest(master_address="127.0.0.1", master_port=29999, rank_offset=1,
                                              world_size=2, group_name="bad", backend="gloo", timeout_s=timeout_s)
        with pytest.raises(grpc.RpcError) as err:
            stub.InitWeightUpdateGroup(req, timeout=10, metadata=(("authorization", f"Bearer {token}"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "timeout_s" in err.value.details()


def test_health_follows_an_engine_that_cannot_answer_and_sigterm_still_stops(wedge_server):
    """A push whose trainer never sends holds the engine in a collective: health must say so, and
    SIGTERM must end the server within seconds all the same."""
    with RolloutClient(wedge_server.address, timeout=60) as client:
        store = master_store("127.0.0.1", None, 2, 60)
        trainer: list[CommGroup] = []
        t = threading.Thread(target=lambda: trainer.append(CommGroup.join(
            GroupConfig("127.0.0.1", store.port, 0, 2, "stuck", "gloo", 60), "cpu", store)))
        t.start()
        client.init_weight_update_group("127.0.0.1", store.port, 1, 2, "stuck", "gloo", timeout_s=60)
        t.join(timeout=30)
        pusher = threading.Thread(target=lambda: _swallow(lambda: client.update_weights_from_distributed(
            group_name="stuck", names=["model.norm.weight"], dtypes=["float32"], shapes=[[64]], version=1)))
        pusher.start()
        deadline = time.monotonic() + STALL_S + 5
        while client.health() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.health(), "health stayed SERVING while the engine could not answer"
        start = time.monotonic()
        wedge_server.proc.send_signal(signal.SIGTERM)
        code = wedge_server.proc.wait(15)
        took = time.monotonic() - start
        assert took < 8, f"SIGTERM took {took:.1f} s to stop a server whose engine was stuck"
        assert code == 0, wedge_server.log()
        trainer[0].close()
        pusher.join(timeout=10)


def _swallow(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the push is expected to fail when the server goes away
        pass


def test_a_huge_prompt_is_refused_cheaply_and_health_keeps_answering(server, token):
    """Millions of ids are refused from the message's size, before any per-token work, while health
    checks keep their usual latency."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 30)])
    stub = rollout_pb2_grpc.RolloutStub(channel)
    metadata = [("authorization", f"Bearer {token}")]
    big = pb.GenerateRequest(input_ids=[1] * 12_000_000)  # 12 MB: under gRPC's limit, far over the context
    huge = pb.GenerateRequest(input_ids=[1] * 80_000_000)  # 80 MB: over the server's request limit
    with channel, RolloutClient(server.address, token=token, timeout=30) as client:
        latencies: list[float] = []
        stop = threading.Event()

        def ping() -> None:
            while not stop.is_set():
                start = time.monotonic()
                assert client.health()
                latencies.append(time.monotonic() - start)
                time.sleep(0.02)

        pinger = threading.Thread(target=ping)
        pinger.start()
        try:
            for request, code, words in ((big, grpc.StatusCode.OUT_OF_RANGE, "context length"),
                                         (huge, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(request, metadata=metadata, timeout=30))
                assert err.value.code() == code, err.value.details()
                assert words in err.value.details() and len(err.value.details()) < 300
        finally:
            stop.set()
            pinger.join(timeout=10)
        assert latencies and max(latencies) < 1.0, f"health checks waited {max(latencies):.2f} s meanwhile"
        _assert_serves(client)
