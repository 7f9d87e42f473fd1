"""CUDA IPC through the driver API (ctypes on libcuda): raw 64-byte handles, no pickled objects.

The exporter finds the allocation that holds a tensor (``cuMemGetAddressRange``) and gets its
handle; the importer opens the handle, checks the mapping is large enough, and wraps the bytes in a
uint8 tensor without copying. A handle is the raw ``CUipcMemHandle``, so any process (another
framework, another language) can produce one.

Caveats: IPC works between processes only (not within one), and not for memory from
``cuMemCreate`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``): the exporter says so.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from rollout.errors import FailedPreconditionError, InvalidArgumentError

HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 0x1


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


def handle_bytes(handle: _Handle) -> bytes:
    """All 64 bytes of a handle. (``handle.reserved`` is a C string to ctypes and stops at the first
    zero byte, which real handles contain.)"""
    return ctypes.string_at(ctypes.addressof(handle), HANDLE_BYTES)


class _Driver:
    """The few driver entry points IPC needs, with their argument types declared."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, sz = ctypes.c_uint64, ctypes.c_size_t
        self._err_string = lib.cuGetErrorString
        self._err_string.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self.address_range = _symbol(lib, "cuMemGetAddressRange_v2", "cuMemGetAddressRange")
        self.address_range.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(sz), u64]
        self.get_handle = lib.cuIpcGetMemHandle
        self.get_handle.argtypes = [ctypes.POINTER(_Handle), u64]
        self.open_handle = _symbol(lib, "cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
        self.open_handle.argtypes = [ctypes.POINTER(u64), _Handle, ctypes.c_uint]
        self.close_handle = lib.cuIpcCloseMemHandle
        self.close_handle.argtypes = [u64]

    def check(self, result: int, what: str) -> None:
        if result != 0:
            msg = ctypes.c_char_p()
            self._err_string(result, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else f"error {result}"
            raise FailedPreconditionError(f"CUDA IPC: {what} failed: {text}")


def _symbol(lib: ctypes.CDLL, *names: str):
    for name in names:
        if hasattr(lib, name):
            return getattr(lib, name)
    raise OSError(f"libcuda has none of {names}")


@functools.lru_cache(maxsize=1)
def driver() -> _Driver:
    """The process's driver bindings (loaded on first use; raises where there is no CUDA driver)."""
    return _Driver()


@dataclass(frozen=True, slots=True)
class ExportedRange:
    """Bytes ``[offset, offset + size)`` of the allocation behind ``handle`` on ``device_index``."""

    device_index: int
    handle: bytes
    offset: int
    size: int


def allocation_of(ptr: int, device: torch.device) -> tuple[int, int]:
    """``(base address, size)`` of the device allocation containing address ``ptr``."""
    drv = driver()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    with torch.cuda.device(device):
        drv.check(drv.address_range(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
    return base.value, size.value


def export_range(ptr: int, nbytes: int, device: torch.device) -> ExportedRange:
    """An IPC description of ``nbytes`` at device address ``ptr`` (inside one allocation)."""
    drv = driver()
    base, size = allocation_of(ptr, device)
    if ptr + nbytes > base + size:
        raise InvalidArgumentError("the range crosses the end of its allocation", field="tensors")
    handle = _Handle()
    with torch.cuda.device(device):
        result = drv.get_handle(ctypes.byref(handle), base)
    if result != 0:
        drv.check(result, "cuIpcGetMemHandle (memory from expandable segments or cuMemCreate cannot be shared)")
    return ExportedRange(device.index or 0, handle_bytes(handle), ptr - base, nbytes)


class _DeviceBytes:
    """Exposes raw device memory through ``__cuda_array_interface__`` so torch can view it."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None,
        }


class ImportedAllocation:
    """An opened IPC handle: views of it stay valid until ``close``."""

    def __init__(self, handle: bytes, device: torch.device) -> None:
        if not isinstance(handle, (bytes, bytearray)) or len(handle) != HANDLE_BYTES:
            raise InvalidArgumentError(f"a CUDA IPC handle is {HANDLE_BYTES} bytes", field="handle")
        self.device = device
        drv = driver()
        raw = _Handle()
        ctypes.memmove(ctypes.addressof(raw), bytes(handle), HANDLE_BYTES)
        ptr = ctypes.c_uint64()
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)  # makes the device's primary context current for the driver
            drv.check(drv.open_handle(ctypes.byref(ptr), raw, _LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
        self.ptr = ptr.value
        try:
            _, self.size = allocation_of(self.ptr, device)
        except FailedPreconditionError:
            self.close()
            raise

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` at ``offset`` as a uint8 tensor on the device (no copy)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise InvalidArgumentError(
                f"bytes [{offset}, {offset + nbytes}) lie outside the shared allocation of {self.size}", field="offset"
            )
        with torch.cuda.device(self.device):
            return torch.as_tensor(_DeviceBytes(self.ptr + offset, nbytes), device=self.device)

    def close(self) -> None:
        """Unmap the allocation (the caller has finished every read of its views)."""
        if self.ptr:
            with torch.cuda.device(self.device):
                driver().check(driver().close_handle(self.ptr), "cuIpcCloseMemHandle")
            self.ptr = 0
