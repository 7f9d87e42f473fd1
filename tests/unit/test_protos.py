"""The committed generated modules match rollout.proto, and import the way the package uses them."""

from __future__ import annotations

import os

from protos import generate as gen


def test_committed_modules_match_proto(tmp_path):
    written = gen.generate(str(tmp_path))
    assert [os.path.basename(p) for p in written] == list(gen.GENERATED)
    for path in written:
        committed = os.path.join(gen.REPO_ROOT, "protos", os.path.basename(path))
        with open(path) as fresh, open(committed) as old:
            assert fresh.read() == old.read(), f"{committed} is stale: run `python protos/generate.py`"


def test_service_module_imports_from_package():
    from protos import rollout_pb2, rollout_pb2_grpc

    with open(os.path.join(gen.REPO_ROOT, "protos", "rollout_pb2_grpc.py")) as f:
        assert "from protos import rollout_pb2" in f.read()
    service = rollout_pb2.DESCRIPTOR.services_by_name["Rollout"]
    assert service.full_name == "rollout.v1.Rollout"
    expected = {
        "Generate",
        "Abort",
        "PauseGeneration",
        "ContinueGeneration",
        "FlushCache",
        "GetInfo",
        "InitWeightUpdateGroup",
        "DestroyWeightUpdateGroup",
        "UpdateWeightsFromDistributed",
        "UpdateWeightsFromTensor",
        "UpdateWeightsFromDisk",
        "ReleaseMemory",
        "ResumeMemory",
        "RebalanceExperts",
    }
    assert {m.name for m in service.methods} == expected
    assert service.methods_by_name["Generate"].server_streaming
    assert hasattr(rollout_pb2_grpc, "RolloutStub") and hasattr(rollout_pb2_grpc, "RolloutServicer")


def test_optional_sampling_fields_track_presence():
    from protos import rollout_pb2

    sp = rollout_pb2.SamplingParams()
    assert not sp.HasField("temperature")
    sp.temperature = 0.0
    assert sp.HasField("temperature")
    decoded = rollout_pb2.SamplingParams.FromString(sp.SerializeToString())
    assert decoded.HasField("temperature") and decoded.temperature == 0.0
    assert not decoded.HasField("n")
