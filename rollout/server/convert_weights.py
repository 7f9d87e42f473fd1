"""Weight-update protos <-> the engine's weight commands (``rollout.engine.messages``).

Requests become typed commands here (the server side); the clients build the requests from the
keyword form ``weight_sync`` produces on the trainer side (``layouts_to_args``). These functions are
the only place the two meet the protos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protos import rollout_pb2 as pb
from rollout.engine.messages import (
    DestroyWeightGroup,
    InitWeightGroup,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
)
from rollout.errors import InvalidArgumentError, quoted
from rollout.types import SwapResult
from weight_sync.buckets import WireLayout
from weight_sync.sources import Source, source_from_dict


def _shapes(shapes: Sequence[Sequence[int]]) -> list[pb.TensorShape]:
    return [pb.TensorShape(dims=[int(d) for d in s]) for s in shapes]


def _layout_from_proto(msg: Any) -> WireLayout:
    return WireLayout(
        names=list(msg.names),
        dtypes=list(msg.dtypes),
        shapes=[list(s.dims) for s in msg.shapes],
        offsets=list(msg.offsets) or None,
        bucket_sizes=list(msg.bucket_sizes) or None,
        flat_bucket=bool(msg.flat_bucket),
    )


def _version(msg: Any) -> int | None:
    return msg.version if msg.HasField("version") else None


def _layout_to_proto(msg: Any, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
                     offsets: Sequence[int] | None, bucket_sizes: Sequence[int] | None, flat_bucket: bool,
                     version: int | None) -> Any:
    msg.names.extend(names)
    msg.dtypes.extend(str(d).removeprefix("torch.") for d in dtypes)
    msg.shapes.extend(_shapes(shapes))
    msg.offsets.extend(int(o) for o in offsets or ())
    msg.bucket_sizes.extend(int(b) for b in bucket_sizes or ())
    msg.flat_bucket = bool(flat_bucket)
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int):  # int() would coerce 7.9 or "8"
            raise InvalidArgumentError(f"must be an integer, got {quoted(version)}", field="version")
        msg.version = version
    return msg


# ---------------------------------------------------------------------------------------------- groups
def init_group_from_proto(msg: pb.InitWeightUpdateGroupRequest) -> InitWeightGroup:
    if not msg.master_address:
        raise InvalidArgumentError("the trainer's address is required", field="master_address")
    return InitWeightGroup(
        master_address=msg.master_address,
        master_port=int(msg.master_port),
        rank_offset=int(msg.rank_offset),
        world_size=int(msg.world_size),
        group_name=msg.group_name or "default",
        backend=msg.backend or "nccl",
        # 0 is the proto's "unset"; anything else is checked by the engine (negative, NaN, huge: refused).
        timeout_s=None if msg.timeout_s == 0 else float(msg.timeout_s),
    )


def destroy_group_from_proto(msg: pb.DestroyWeightUpdateGroupRequest) -> DestroyWeightGroup:
    return DestroyWeightGroup(msg.group_name or "default")


def init_group_to_proto(master_address: str, master_port: int, rank_offset: int, world_size: int,
                        group_name: str = "default", backend: str = "nccl",
                        timeout_s: float = 0.0) -> pb.InitWeightUpdateGroupRequest:
    return pb.InitWeightUpdateGroupRequest(master_address=master_address, master_port=int(master_port),
                                           rank_offset=int(rank_offset), world_size=int(world_size),
                                           group_name=group_name, backend=backend, timeout_s=float(timeout_s or 0))


# ---------------------------------------------------------------------------------------------- updates
def distributed_from_proto(msg: pb.UpdateWeightsFromDistributedRequest) -> UpdateWeightsFromDistributed:
    return UpdateWeightsFromDistributed(_layout_from_proto(msg), msg.group_name or "default", _version(msg),
                                        msg.swap)


def distributed_to_proto(*, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
                         group_name: str = "default", offsets: Sequence[int] | None = None,
                         bucket_sizes: Sequence[int] | None = None, flat_bucket: bool = False,
                         version: int | None = None, swap: bool = False) -> pb.UpdateWeightsFromDistributedRequest:
    msg = pb.UpdateWeightsFromDistributedRequest(group_name=group_name, swap=_flag(swap))
    return _layout_to_proto(msg, names, dtypes, shapes, offsets, bucket_sizes, flat_bucket, version)


def _source_from_proto(src: pb.TensorSource) -> Source:
    kind = src.WhichOneof("source")
    if kind == "cuda_ipc":
        m = src.cuda_ipc
        return source_from_dict({"cuda_ipc": {"device_index": m.device_index, "handle": bytes(m.handle),
                                              "offset": m.offset, "size": m.size}})
    if kind == "shared_memory":
        m = src.shared_memory
        return source_from_dict({"shared_memory": {"name": m.name, "offset": m.offset, "size": m.size}})
    raise InvalidArgumentError("each source needs cuda_ipc or shared_memory", field="sources")


def _source_to_proto(src: dict[str, Any] | pb.TensorSource) -> pb.TensorSource:
    if isinstance(src, pb.TensorSource):
        return src
    if "cuda_ipc" in src:
        return pb.TensorSource(cuda_ipc=pb.CudaIpcHandle(**src["cuda_ipc"]))
    if "shared_memory" in src:
        return pb.TensorSource(shared_memory=pb.SharedMemoryRef(**src["shared_memory"]))
    raise InvalidArgumentError("each source needs cuda_ipc or shared_memory", field="sources")


def tensor_from_proto(msg: pb.UpdateWeightsFromTensorRequest) -> UpdateWeightsFromTensor:
    sources = tuple(_source_from_proto(s) for s in msg.sources)
    return UpdateWeightsFromTensor(_layout_from_proto(msg), sources, _version(msg), msg.swap, msg.more)


def tensor_to_proto(*, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
                    sources: Sequence[dict[str, Any] | pb.TensorSource], offsets: Sequence[int] | None = None,
                    bucket_sizes: Sequence[int] | None = None, flat_bucket: bool = False,
                    version: int | None = None, swap: bool = False,
                    more: bool = False) -> pb.UpdateWeightsFromTensorRequest:
    msg = pb.UpdateWeightsFromTensorRequest(sources=[_source_to_proto(s) for s in sources], swap=_flag(swap),
                                            more=_flag(more, "more"))
    return _layout_to_proto(msg, names, dtypes, shapes, offsets, bucket_sizes, flat_bucket, version)


def disk_from_proto(msg: pb.UpdateWeightsFromDiskRequest) -> UpdateWeightsFromDisk:
    if not msg.model_path:
        raise InvalidArgumentError("a checkpoint directory is required", field="model_path")
    return UpdateWeightsFromDisk(msg.model_path, _version(msg), msg.swap)


# ---------------------------------------------------------------------------------------------- replies
def update_result_to_proto(result: int | SwapResult) -> pb.UpdateWeightsResponse:
    """An update's result: the version, and for a swap request whether it switched without a pause."""
    if isinstance(result, SwapResult):
        return pb.UpdateWeightsResponse(weight_version=result.weight_version, swapped=result.swapped,
                                        note=result.note)
    return pb.UpdateWeightsResponse(weight_version=int(result))


def update_result_from_proto(msg: pb.UpdateWeightsResponse, swap: bool) -> int | SwapResult:
    """The client's side of ``update_result_to_proto``: the version, or a ``SwapResult`` for a swap request."""
    if swap:
        return SwapResult(int(msg.weight_version), msg.swapped, msg.note)
    return int(msg.weight_version)


def _flag(value: Any, field: str = "swap") -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"must be true or false, got {quoted(value)}", field=field)
    return value
