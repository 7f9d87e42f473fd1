"""POSIX shared memory buffers: the CPU stand-in for CUDA IPC (same metadata, same engine path).

The exporter creates a named segment (``multiprocessing.shared_memory``) and packs a bucket into
it. The importer maps it read-only by name from ``/dev/shm`` with ``mmap``, bypassing
``multiprocessing``'s resource tracker, which would otherwise unlink the exporter's segment when
the importing process exits.
"""

from __future__ import annotations

import mmap
import os
import re
from multiprocessing import shared_memory

import torch

from rollout.errors import InvalidArgumentError, quoted

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # a plain file name: no path can be smuggled in


class ExportedBuffer:
    """A new shared-memory segment of ``nbytes`` and a uint8 tensor over it (owned: ``close`` frees it)."""

    def __init__(self, nbytes: int) -> None:
        self._shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        self.name = self._shm.name.lstrip("/")
        self.nbytes = nbytes
        empty = torch.empty(0, dtype=torch.uint8)
        self.tensor = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=nbytes) if nbytes else empty

    def close(self) -> None:
        """Unmap and unlink the segment (importers that still map it keep their mapping)."""
        if self._shm is None:
            return
        self.tensor = None
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
        shm.unlink()


class ImportedBuffer:
    """A read-only mapping of the segment ``name``; views stay valid until ``close``."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidArgumentError(f"not a shared-memory segment name: {quoted(name)}", field="name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise InvalidArgumentError(f"cannot open shared memory {quoted(name)}: {e.strerror}", field="name") from e
        try:
            self.size = os.fstat(fd).st_size
            # A private copy-on-write mapping is writable for torch (no warning) but never writes back.
            self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_PRIVATE) if self.size else None
        finally:
            os.close(fd)
        empty = torch.empty(0, dtype=torch.uint8)
        self._tensor = torch.frombuffer(self._map, dtype=torch.uint8) if self._map else empty

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` at ``offset`` of the segment as a uint8 tensor (no copy)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise InvalidArgumentError(
                f"bytes [{offset}, {offset + nbytes}) lie outside the segment of {self.size}", field="offset"
            )
        return self._tensor[offset:offset + nbytes]

    def close(self) -> None:
        """Unmap (views must be dropped first)."""
        self._tensor = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
            self._map = None
