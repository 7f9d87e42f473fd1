"""Arenas: contiguous blocks that hand out tensors and are released and resumed whole.

An arena is one ``(nbytes,)`` uint8 tensor, ``data``; ``take(shape, dtype)`` carves the next aligned
slice of it as a typed view. Release and resume act on the whole block, so every view follows:

- ``CudaArena``: the block is a ``VirtualRange``; release unmaps the physical memory (addresses stay
  reserved), resume maps new memory at the same addresses, so views keep their ``data_ptr``.
- ``CpuArena``: release shrinks the storage to 0 bytes, resume grows it again (at a new address,
  which on CPU nobody has captured). It lets CPU tests drive the engine side of the cycle.

With ``backup`` the contents are copied to host memory before release and back after resume;
without it, resumed memory reads as zeros.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from memory_saver.cuda_vmm import VirtualRange, VmmDriver
from memory_saver.state import ALIGNMENT, MemoryState, MemoryStateError, align_up


class Arena(ABC):
    """A block of ``nbytes`` handing out tensors by bump allocation; released and resumed as a whole."""

    data: torch.Tensor  # (nbytes,) uint8 over the whole block

    def __init__(self, tag: str, backup: bool) -> None:
        self.tag = tag
        self.backup = backup
        self._state = MemoryState.ACTIVE
        self._used = 0

    @property
    def state(self) -> MemoryState:
        return self._state

    @property
    def nbytes(self) -> int:
        """Bytes the block holds while active (its capacity)."""
        return self.data.numel()

    @property
    def used(self) -> int:
        """Bytes handed out so far, alignment padding included."""
        return self._used

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The next ``ALIGNMENT``-aligned slice of the block as a tensor of ``shape`` and ``dtype``."""
        self._require(MemoryState.ACTIVE, "allocate from")
        size = math.prod(shape) * dtype.itemsize
        start = align_up(self._used, ALIGNMENT)
        if start + size > self.nbytes:
            raise MemoryStateError(
                f"arena of tag {self.tag!r} is full: {size} bytes asked at offset {start} of {self.nbytes}"
            )
        self._used = start + size
        return self.data[start:start + size].view(dtype).view(tuple(shape))

    def release(self) -> bool:
        """Give the memory back (after a backup copy if ``backup``); False if already released."""
        self._require_open("release")
        if self._state is MemoryState.RELEASED:
            return False
        self._release()
        self._state = MemoryState.RELEASED
        return True

    def resume(self) -> bool:
        """Back the block with memory again and restore the backup (else zeros); False if already active."""
        self._require_open("resume")
        if self._state is MemoryState.ACTIVE:
            return False
        self._resume()
        self._state = MemoryState.ACTIVE
        return True

    def adopt(self, shadow: Arena) -> None:
        """Make ``shadow``'s contents this arena's, at this arena's addresses; ``shadow`` is closed after.

        The switch of a zero-pause weight update: ``shadow`` (same size, same kind) was filled while
        this arena kept serving. On CUDA the shadow's physical memory moves behind this arena's
        addresses (no copy; CUDA graphs over them stay valid) and this arena's old memory is freed;
        on CPU the bytes are copied. Nothing may use either arena during the call. On failure this
        arena holds what it held before.
        """
        self._require(MemoryState.ACTIVE, "swap memory into")
        shadow._require(MemoryState.ACTIVE, "swap memory out of")
        if type(shadow) is not type(self) or shadow.nbytes != self.nbytes:
            raise MemoryStateError(f"a shadow must be an arena like this one ({type(self).__name__} of "
                                   f"{self.nbytes} bytes), got {type(shadow).__name__} of {shadow.nbytes}")
        self._adopt(shadow)
        shadow._state = MemoryState.CLOSED

    def close(self) -> None:
        """Free everything for good; the arena's tensors must not be used afterwards."""
        if self._state is not MemoryState.CLOSED:
            self._close()
            self._state = MemoryState.CLOSED

    def _require(self, state: MemoryState, action: str) -> None:
        if self._state is not state:
            raise MemoryStateError(
                f"cannot {action} an arena of tag {self.tag!r} that is {self._state.value}"
                + ("; resume it first" if self._state is MemoryState.RELEASED else "")
            )

    def _require_open(self, action: str) -> None:
        if self._state is MemoryState.CLOSED:
            raise MemoryStateError(f"cannot {action} an arena of tag {self.tag!r}: it is closed")

    @abstractmethod
    def _release(self) -> None:
        """Free the physical memory (copying it to host first when ``backup``)."""

    @abstractmethod
    def _resume(self) -> None:
        """Provide physical memory again and fill it from the backup, or with zeros."""

    @abstractmethod
    def _close(self) -> None:
        """Free the memory and anything reserved for it."""

    @abstractmethod
    def _adopt(self, shadow: Arena) -> None:
        """Take ``shadow``'s contents (its checks done) and free the shadow's memory."""


class CpuArena(Arena):
    """An arena in host memory; release frees the storage, resume allocates it again."""

    def __init__(self, tag: str, nbytes: int, backup: bool = False, zero: bool = True) -> None:
        super().__init__(tag, backup)
        self.data = (torch.zeros if zero else torch.empty)(nbytes, dtype=torch.uint8)  # (nbytes,)
        self._host: torch.Tensor | None = None

    def _release(self) -> None:
        if self.backup:
            self._host = self.data.clone()
        # Views share this storage: shrinking it frees the memory of every tensor taken from the arena.
        self.data.untyped_storage().resize_(0)

    def _resume(self) -> None:
        self.data.untyped_storage().resize_(self.nbytes)
        if self._host is not None:
            self.data.copy_(self._host)
            self._host = None
        else:
            self.data.zero_()

    def _close(self) -> None:
        self.data.untyped_storage().resize_(0)
        self._host = None

    def _adopt(self, shadow: Arena) -> None:
        # Host memory: no graph holds these addresses, and a copy keeps every view's storage.
        self.data.copy_(shadow.data)
        shadow._close()


class _CudaArrayInterface:
    """Presents a raw device pointer to ``torch.as_tensor`` without copying or owning it."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None, "version": 2,
        }


def tensor_over(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A ``(nbytes,)`` uint8 tensor whose ``data_ptr()`` is ``ptr`` (mapped memory of ``device``).

    torch's own ``__cuda_array_interface__`` path first; CuPy ``UnownedMemory`` + DLPack if that
    fails. The tensor does not own the memory: the arena does.
    """
    with torch.cuda.device(device):
        try:
            t = torch.as_tensor(_CudaArrayInterface(ptr, nbytes), device=device)
        except Exception as exc:
            try:
                import cupy
            except ImportError:
                raise exc from None
            mem = cupy.cuda.UnownedMemory(ptr, nbytes, None, device.index)
            arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
            t = torch.from_dlpack(arr)
    if t.data_ptr() != ptr or t.numel() != nbytes or t.dtype != torch.uint8 or t.device != device:
        raise RuntimeError(
            f"tensor over 0x{ptr:x} came back as {t.dtype} x {t.numel()} at 0x{t.data_ptr():x} on {t.device}"
        )
    return t


class CudaArena(Arena):
    """An arena over a reserved device address range (CUDA virtual memory management)."""

    def __init__(self, tag: str, nbytes: int, device: torch.device, driver: VmmDriver, backup: bool = False,
                 zero: bool = True) -> None:
        super().__init__(tag, backup)
        assert device.type == "cuda" and device.index is not None, device
        self.device = device
        with torch.cuda.device(device):
            torch.cuda.synchronize()  # also makes the device's primary context current for the driver calls
            self._range = VirtualRange(driver, device.index, nbytes)
            try:
                self._range.map()
                self.data = tensor_over(self._range.ptr, self._range.nbytes, device)
                if zero:
                    self.data.zero_()
            except BaseException:
                self._range.free()
                raise
        self._host: torch.Tensor | None = None  # pinned; kept across cycles since pinning costs more than copying

    @property
    def ptr(self) -> int:
        """First address of the block; the same for the arena's whole life."""
        return self._range.ptr

    def _release(self) -> None:
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()  # kernels in flight may still use the memory
            if self.backup:
                if self._host is None:
                    self._host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
                self._host.copy_(self.data)  # device -> pinned host, synchronous
            self._range.unmap()

    def _resume(self) -> None:
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            self._range.map()
            if self.backup and self._host is not None:
                self.data.copy_(self._host, non_blocking=True)
            else:
                self.data.zero_()
            torch.cuda.synchronize()

    def _close(self) -> None:
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            self._range.free()
        self._host = None

    def _adopt(self, shadow: Arena) -> None:
        assert isinstance(shadow, CudaArena)
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()  # no kernel may still read the old memory or write the shadow
            self._range.take_backing(shadow._range)
        shadow._host = None
