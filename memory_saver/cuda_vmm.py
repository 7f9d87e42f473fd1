"""CUDA virtual memory management: an address range reserved once whose physical backing comes and goes.

::

    reserve (once)      [ ptr ............................ ptr + nbytes )   virtual addresses only
    map                 cuMemCreate -> handle; cuMemMap(ptr, handle); cuMemSetAccess(read+write)
    unmap               cuMemUnmap(ptr); cuMemRelease(handle)    physical memory back to the driver
    map again           a new handle mapped at the same ptr: tensors and CUDA graphs over ptr stay valid

Two driver bindings, chosen at run time: ``cuda.bindings.driver`` (cuda-python) when importable, else
``libcuda.so.1`` through ctypes (it ships with every driver; CuPy's driver module has no VMM calls).
Every call's CUresult is checked and a failure raises ``CudaDriverError`` naming the call and result.
"""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

from memory_saver.state import CudaDriverError, align_up

# Driver enum values (cuda.h); the ctypes binding needs them as plain integers.
_ALLOCATION_TYPE_PINNED = 1
_LOCATION_TYPE_DEVICE = 1
_ACCESS_PROT_READWRITE = 3
_GRANULARITY_MINIMUM = 0


class VmmDriver(Protocol):
    """The driver calls a ``VirtualRange`` needs; ``device`` is the CUDA ordinal."""

    name: str

    def granularity(self, device: int) -> int: ...
    def reserve(self, size: int, alignment: int) -> int: ...
    def free_address(self, ptr: int, size: int) -> None: ...
    def create(self, size: int, device: int) -> Any: ...
    def release_handle(self, handle: Any) -> None: ...
    def map(self, ptr: int, size: int, handle: Any) -> None: ...
    def set_access(self, ptr: int, size: int, device: int) -> None: ...
    def unmap(self, ptr: int, size: int) -> None: ...


class CudaPythonDriver:
    """VMM calls through ``cuda.bindings.driver`` (or ``cuda.cuda`` of cuda-python < 12.6)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver
        except ImportError:
            from cuda import cuda as driver  # type: ignore[no-redef]  # older cuda-python layout
        self._d = driver
        self._check("cuInit", driver.cuInit(0))

    def _check(self, call: str, ret: tuple) -> Any:
        err = ret[0]
        if err != self._d.CUresult.CUDA_SUCCESS:
            raise CudaDriverError(call, getattr(err, "name", str(err)))
        return ret[1] if len(ret) > 1 else None

    def _prop(self, device: int) -> Any:
        d = self._d
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        return prop

    def granularity(self, device: int) -> int:
        flag = self._d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        return int(self._check("cuMemGetAllocationGranularity",
                               self._d.cuMemGetAllocationGranularity(self._prop(device), flag)))

    def reserve(self, size: int, alignment: int) -> int:
        ret = self._d.cuMemAddressReserve(size, alignment, self._d.CUdeviceptr(0), 0)
        return int(self._check("cuMemAddressReserve", ret))

    def free_address(self, ptr: int, size: int) -> None:
        self._check("cuMemAddressFree", self._d.cuMemAddressFree(ptr, size))

    def create(self, size: int, device: int) -> Any:
        return self._check("cuMemCreate", self._d.cuMemCreate(size, self._prop(device), 0))

    def release_handle(self, handle: Any) -> None:
        self._check("cuMemRelease", self._d.cuMemRelease(handle))

    def map(self, ptr: int, size: int, handle: Any) -> None:
        self._check("cuMemMap", self._d.cuMemMap(ptr, size, 0, handle, 0))

    def set_access(self, ptr: int, size: int, device: int) -> None:
        d = self._d
        desc = d.CUmemAccessDesc()
        desc.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = device
        desc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._check("cuMemSetAccess", d.cuMemSetAccess(ptr, size, [desc], 1))

    def unmap(self, ptr: int, size: int) -> None:
        self._check("cuMemUnmap", self._d.cuMemUnmap(ptr, size))


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class AllocationProp(ctypes.Structure):
    """``CUmemAllocationProp`` (32 bytes on 64-bit Linux)."""

    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class AccessDesc(ctypes.Structure):
    """``CUmemAccessDesc`` (12 bytes)."""

    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class CtypesDriver:
    """VMM calls straight into ``libcuda.so.1``."""

    name = "libcuda (ctypes)"

    def __init__(self, library: str = "libcuda.so.1") -> None:
        lib = ctypes.CDLL(library)
        u64, size_t, ull, res = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_ulonglong, ctypes.c_int
        signatures: dict[str, list[Any]] = {
            "cuInit": [ctypes.c_uint],
            "cuGetErrorName": [res, ctypes.POINTER(ctypes.c_char_p)],
            "cuMemGetAllocationGranularity": [ctypes.POINTER(size_t), ctypes.POINTER(AllocationProp), ctypes.c_int],
            "cuMemAddressReserve": [ctypes.POINTER(u64), size_t, size_t, u64, ull],
            "cuMemAddressFree": [u64, size_t],
            "cuMemCreate": [ctypes.POINTER(u64), size_t, ctypes.POINTER(AllocationProp), ull],
            "cuMemRelease": [u64],
            "cuMemMap": [u64, size_t, size_t, u64, ull],
            "cuMemSetAccess": [u64, size_t, ctypes.POINTER(AccessDesc), size_t],
            "cuMemUnmap": [u64, size_t],
        }
        for fname, argtypes in signatures.items():
            fn = getattr(lib, fname)
            fn.argtypes = argtypes
            fn.restype = res
        self._lib = lib
        self._check("cuInit", lib.cuInit(0))

    def _check(self, call: str, result: int) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            known = self._lib.cuGetErrorName(result, ctypes.byref(name)) == 0 and name.value
            raise CudaDriverError(call, name.value.decode() if known else f"CUresult {result}")

    @staticmethod
    def _prop(device: int) -> AllocationProp:
        prop = AllocationProp()
        prop.type = _ALLOCATION_TYPE_PINNED
        prop.location.type = _LOCATION_TYPE_DEVICE
        prop.location.id = device
        return prop

    def granularity(self, device: int) -> int:
        out = ctypes.c_size_t()
        prop = self._prop(device)
        ret = self._lib.cuMemGetAllocationGranularity(ctypes.byref(out), ctypes.byref(prop), _GRANULARITY_MINIMUM)
        self._check("cuMemGetAllocationGranularity", ret)
        return int(out.value)

    def reserve(self, size: int, alignment: int) -> int:
        ptr = ctypes.c_uint64()
        self._check("cuMemAddressReserve", self._lib.cuMemAddressReserve(ctypes.byref(ptr), size, alignment, 0, 0))
        return int(ptr.value)

    def free_address(self, ptr: int, size: int) -> None:
        self._check("cuMemAddressFree", self._lib.cuMemAddressFree(ptr, size))

    def create(self, size: int, device: int) -> int:
        handle = ctypes.c_uint64()
        prop = self._prop(device)
        self._check("cuMemCreate", self._lib.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(prop), 0))
        return int(handle.value)

    def release_handle(self, handle: int) -> None:
        self._check("cuMemRelease", self._lib.cuMemRelease(handle))

    def map(self, ptr: int, size: int, handle: int) -> None:
        self._check("cuMemMap", self._lib.cuMemMap(ptr, size, 0, handle, 0))

    def set_access(self, ptr: int, size: int, device: int) -> None:
        desc = AccessDesc()
        desc.location.type = _LOCATION_TYPE_DEVICE
        desc.location.id = device
        desc.flags = _ACCESS_PROT_READWRITE
        self._check("cuMemSetAccess", self._lib.cuMemSetAccess(ptr, size, ctypes.byref(desc), 1))

    def unmap(self, ptr: int, size: int) -> None:
        self._check("cuMemUnmap", self._lib.cuMemUnmap(ptr, size))


def load_driver() -> VmmDriver:
    """cuda-python's driver bindings when installed, else libcuda through ctypes."""
    try:
        return CudaPythonDriver()
    except ImportError:
        return CtypesDriver()


class VirtualRange:
    """``nbytes`` (rounded up to the allocation granularity) of reserved device addresses at ``ptr``.

    ``map()`` backs the whole range with one new physical allocation, ``unmap()`` gives it back; both
    are no-ops when already in that state. ``free()`` also returns the addresses; nothing may use
    the range afterwards.
    """

    def __init__(self, driver: VmmDriver, device: int, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        self.driver = driver
        self.device = device
        granularity = driver.granularity(device)
        self.nbytes = align_up(nbytes, granularity)
        self.ptr = driver.reserve(self.nbytes, granularity)
        self._handle: Any = None
        self._freed = False

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def map(self) -> None:
        """Create physical memory and map it at ``ptr`` with read/write access for ``device``."""
        if self._freed:
            raise RuntimeError("the address range was freed")
        if self._handle is not None:
            return
        handle = self.driver.create(self.nbytes, self.device)
        try:
            self.driver.map(self.ptr, self.nbytes, handle)
        except BaseException:
            self.driver.release_handle(handle)
            raise
        try:
            # Access rights belong to a mapping: they must be set again after every map.
            self.driver.set_access(self.ptr, self.nbytes, self.device)
        except BaseException:
            self.driver.unmap(self.ptr, self.nbytes)
            self.driver.release_handle(handle)
            raise
        self._handle = handle

    def unmap(self) -> None:
        """Unmap and release the physical memory; the addresses stay reserved."""
        if self._handle is None:
            return
        self.driver.unmap(self.ptr, self.nbytes)
        handle, self._handle = self._handle, None
        self.driver.release_handle(handle)

    def take_backing(self, other: VirtualRange) -> None:
        """Put ``other``'s physical memory behind these addresses and release this range's own.

        Afterwards ``ptr`` reads what ``other`` held, and ``other`` is freed (its addresses too).
        Nothing may run on either range meanwhile. If mapping ``other``'s memory here fails, this
        range's own memory is mapped back and the error raised: both ranges stay as they were.
        ::

            before   self.ptr -> A        other.ptr -> B
            after    self.ptr -> B        (other freed; A released)
        """
        if self._freed or other._freed or self._handle is None or other._handle is None:
            raise RuntimeError("both ranges must be mapped to move memory between them")
        if other.nbytes != self.nbytes or other.device != self.device:
            raise ValueError(f"ranges differ: {self.nbytes} bytes on device {self.device} vs {other.nbytes} "
                             f"on device {other.device}")
        own, new = self._handle, other._handle
        self.driver.unmap(self.ptr, self.nbytes)
        try:
            self.driver.map(self.ptr, self.nbytes, new)
            try:
                self.driver.set_access(self.ptr, self.nbytes, self.device)
            except BaseException:
                self.driver.unmap(self.ptr, self.nbytes)
                raise
        except BaseException:
            self.driver.map(self.ptr, self.nbytes, own)  # the old contents come back: nothing changed
            self.driver.set_access(self.ptr, self.nbytes, self.device)
            raise
        self._handle = new
        # The memory of ``new`` stays alive through this range's mapping; ``other`` lets go of it.
        self.driver.unmap(other.ptr, other.nbytes)
        other._handle = None
        other.free()
        self.driver.release_handle(own)

    def free(self) -> None:
        """Unmap if mapped, then give the addresses back."""
        if self._freed:
            return
        self.unmap()
        self.driver.free_address(self.ptr, self.nbytes)
        self._freed = True
