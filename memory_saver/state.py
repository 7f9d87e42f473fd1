"""States, tags and errors shared by every part of the memory saver."""

from __future__ import annotations

import enum

# Offsets of tensors inside an arena are multiples of this, so every view is aligned for vector loads.
ALIGNMENT = 256


class MemoryState(enum.Enum):
    """Where an arena's (or a region's) physical memory is."""

    ACTIVE = "active"  # backed by memory: tensors over it can be used
    RELEASED = "released"  # memory given back; addresses (CUDA) stay reserved for the resume
    CLOSED = "closed"  # addresses freed too: nothing over it may be used again


class MemorySaverError(Exception):
    """Base class of the memory saver's errors."""


class UnknownTagError(MemorySaverError, ValueError):
    """A tag that the saver does not manage."""

    def __init__(self, tag: object, known: tuple[str, ...]) -> None:
        self.tag = tag
        super().__init__(f"unknown memory tag {tag!r}; known tags: {list(known)}")


class MemoryStateError(MemorySaverError, RuntimeError):
    """An operation that the current state forbids (allocating from released memory, using a closed arena)."""


class CudaDriverError(MemorySaverError, RuntimeError):
    """A CUDA driver call failed; ``result`` is the CUresult name (e.g. CUDA_ERROR_OUT_OF_MEMORY)."""

    def __init__(self, call: str, result: str) -> None:
        self.call = call
        self.result = result
        super().__init__(f"{call} failed: {result}")


def align_up(n: int, alignment: int) -> int:
    """Smallest multiple of ``alignment`` that is >= ``n``."""
    return -(-n // alignment) * alignment
