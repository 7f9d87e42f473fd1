"""Tagged regions: the memory of one tag (its arenas), and the saver that holds one region per tag."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from memory_saver.arena import Arena, CpuArena, CudaArena
from memory_saver.cuda_vmm import VmmDriver, load_driver
from memory_saver.state import MemoryState, MemoryStateError, UnknownTagError


class MemoryRegion:
    """The arenas of one tag, released and resumed together.

    ``backup``: copy the contents to host memory before release and back after resume (else the
    resumed memory reads as zeros). Release and resume are no-ops when already in that state.
    """

    def __init__(self, tag: str, device: torch.device | str, backup: bool = False,
                 driver: VmmDriver | None = None) -> None:
        self.tag = tag
        self.device = _concrete(torch.device(device))
        self.backup = backup
        if self.device.type == "cuda" and driver is None:
            driver = load_driver()
        self._driver = driver
        self._arenas: list[Arena] = []
        self._state = MemoryState.ACTIVE

    @property
    def state(self) -> MemoryState:
        return self._state

    @property
    def arenas(self) -> tuple[Arena, ...]:
        return tuple(self._arenas)

    @property
    def nbytes(self) -> int:
        """Bytes of all arenas (what the region holds while active)."""
        return sum(a.nbytes for a in self._arenas)

    def allocate(self, nbytes: int) -> Arena:
        """A new arena of at least ``nbytes`` (CUDA rounds up to the allocation granularity)."""
        if self._state is not MemoryState.ACTIVE:
            raise MemoryStateError(f"cannot allocate from region {self.tag!r} while it is {self._state.value}"
                                   + ("; resume it first" if self._state is MemoryState.RELEASED else ""))
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        if self.device.type == "cuda":
            assert self._driver is not None
            arena: Arena = CudaArena(self.tag, nbytes, self.device, self._driver, backup=self.backup)
        elif self.device.type == "cpu":
            arena = CpuArena(self.tag, nbytes, backup=self.backup)
        else:
            raise ValueError(f"device type {self.device.type!r} is not supported (cuda or cpu)")
        self._arenas.append(arena)
        return arena

    def shadow(self, arena: Arena) -> Arena:
        """A new arena the size of ``arena`` (not zeroed) for ``arena.adopt`` to take over later.

        It is not one of the region's arenas: release and resume do not touch it, and its owner
        closes it (or has it adopted). CUDA: ``CudaDriverError`` (e.g. CUDA_ERROR_OUT_OF_MEMORY)
        when the device has no room for it.
        """
        if self._state is not MemoryState.ACTIVE or arena.state is not MemoryState.ACTIVE:
            raise MemoryStateError(f"cannot shadow an arena of region {self.tag!r} that is not active")
        if self.device.type == "cuda":
            assert self._driver is not None
            return CudaArena(self.tag, arena.nbytes, self.device, self._driver, zero=False)
        return CpuArena(self.tag, arena.nbytes, zero=False)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """One tensor in an arena of its own (zero-filled)."""
        size = max(1, int(torch.Size(shape).numel()) * dtype.itemsize)
        return self.allocate(size).take(shape, dtype)

    def release(self) -> bool:
        """Release every arena; False (and nothing done) if the region is released already."""
        self._require_open("release")
        if self._state is MemoryState.RELEASED:
            return False
        for arena in self._arenas:  # each is a no-op when released: a failed release can be retried
            arena.release()
        self._state = MemoryState.RELEASED
        return True

    def resume(self) -> bool:
        """Resume every arena; False (and nothing done) if the region is active already."""
        self._require_open("resume")
        if self._state is MemoryState.ACTIVE and all(a.state is MemoryState.ACTIVE for a in self._arenas):
            return False
        for arena in self._arenas:
            arena.resume()
        self._state = MemoryState.ACTIVE
        return True

    def close(self) -> None:
        """Free every arena and its addresses for good."""
        for arena in self._arenas:
            arena.close()
        self._state = MemoryState.CLOSED

    def _require_open(self, action: str) -> None:
        if self._state is MemoryState.CLOSED:
            raise MemoryStateError(f"cannot {action} region {self.tag!r}: it is closed")


class MemorySaver:
    """One ``MemoryRegion`` per tag on one device; releases and resumes them by tag.

    The tags are the caller's (the engine's are ``weights``, ``kv_cache`` and ``cuda_graph``)."""

    def __init__(self, device: torch.device | str, tags: Sequence[str], backup_tags: Iterable[str] = (),
                 driver: VmmDriver | None = None) -> None:
        if isinstance(tags, str) or not tags or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"tags must be a non-empty sequence of non-empty strings, got {tags!r}")
        self._tags = tuple(dict.fromkeys(tags))
        backup = set(backup_tags)
        for tag in backup:
            if tag not in self._tags:
                raise UnknownTagError(tag, self._tags)
        dev = _concrete(torch.device(device))
        if dev.type == "cuda" and driver is None:
            driver = load_driver()  # one binding shared by every region
        self.device = dev
        self._regions = {tag: MemoryRegion(tag, dev, tag in backup, driver) for tag in self._tags}

    @property
    def tags(self) -> tuple[str, ...]:
        return self._tags

    def region(self, tag: str) -> MemoryRegion:
        """The region of ``tag``; ``UnknownTagError`` for a tag this saver does not manage."""
        if tag not in self._regions:
            raise UnknownTagError(tag, self._tags)
        return self._regions[tag]

    def check_tags(self, tags: Iterable[str] | None) -> tuple[str, ...]:
        """``tags`` validated and de-duplicated in order (None: every tag)."""
        if tags is None:
            return self._tags
        out: list[str] = []
        for tag in tags:
            if tag not in self._regions:
                raise UnknownTagError(tag, self._tags)
            if tag not in out:
                out.append(tag)
        return tuple(out)

    def release(self, tags: Iterable[str] | None = None) -> list[str]:
        """Release these tags (None: all); returns the tags that were active and are released now."""
        return [tag for tag in self.check_tags(tags) if self._regions[tag].release()]

    def resume(self, tags: Iterable[str] | None = None) -> list[str]:
        """Resume these tags (None: all); returns the tags that were released and are active now."""
        return [tag for tag in self.check_tags(tags) if self._regions[tag].resume()]

    def released_tags(self) -> list[str]:
        return [t for t, r in self._regions.items() if r.state is MemoryState.RELEASED]

    def states(self) -> dict[str, dict[str, object]]:
        """``{tag: {"state": "active" | "released", "bytes": int, "backup": bool}}``."""
        return {t: {"state": r.state.value, "bytes": r.nbytes, "backup": r.backup} for t, r in self._regions.items()}

    def close(self) -> None:
        """Close every region (free memory and addresses)."""
        for region in self._regions.values():
            region.close()


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: the driver needs an ordinal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
