"""Where a colocated bucket's bytes live: a CUDA IPC range or a shared-memory range.

On the wire a source is a plain dict mirroring the proto's ``TensorSource`` oneof::

    {"cuda_ipc": {"device_index": 0, "handle": b"<64 bytes>", "offset": 0, "size": 1048576}}
    {"shared_memory": {"name": "psm_1a2b", "offset": 0, "size": 1048576}}

The bucket's tensors are at their layout offsets from ``offset``; ``size`` is at least the bucket's
``nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from rollout.errors import InvalidArgumentError, quoted


@dataclass(frozen=True, slots=True)
class CudaIpcSource:
    """``size`` bytes at ``offset`` of the CUDA allocation behind the raw ``cudaIpcMemHandle_t``."""

    device_index: int
    handle: bytes
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SharedMemorySource:
    """``size`` bytes at ``offset`` of the POSIX shared-memory segment ``name``."""

    name: str
    offset: int
    size: int


Source = Union[CudaIpcSource, SharedMemorySource]


def source_to_dict(src: Source) -> dict[str, dict[str, Any]]:
    """The wire form of ``src`` (see the module docstring)."""
    if isinstance(src, CudaIpcSource):
        return {"cuda_ipc": {"device_index": src.device_index, "handle": bytes(src.handle), "offset": src.offset,
                             "size": src.size}}
    return {"shared_memory": {"name": src.name, "offset": src.offset, "size": src.size}}


def _int(d: dict, key: str, field: str) -> int:
    v = d.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise InvalidArgumentError(f"{key} must be an integer >= 0", field=field)
    return v


def source_from_dict(value: Any, field: str = "sources") -> Source:
    """Parse one wire source, checking every field's type."""
    if not isinstance(value, dict) or len(value) != 1:
        raise InvalidArgumentError("must be {'cuda_ipc': {...}} or {'shared_memory': {...}}", field=field)
    kind, body = next(iter(value.items()))
    if not isinstance(body, dict):
        raise InvalidArgumentError(f"{quoted(kind)} must be a dict", field=field)
    if kind == "cuda_ipc":
        handle = body.get("handle")
        if not isinstance(handle, (bytes, bytearray)):
            raise InvalidArgumentError("handle must be bytes", field=field)
        return CudaIpcSource(_int(body, "device_index", field), bytes(handle), _int(body, "offset", field),
                             _int(body, "size", field))
    if kind == "shared_memory":
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("name must be a non-empty string", field=field)
        return SharedMemorySource(name, _int(body, "offset", field), _int(body, "size", field))
    raise InvalidArgumentError(f"unknown source kind {quoted(kind)}", field=field)
