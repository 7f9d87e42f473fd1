"""memory_saver on CPU (the same API as CUDA: release frees the storage) and its VMM logic on a fake driver."""

from __future__ import annotations

import ctypes

import pytest
import torch

from memory_saver import (
    ALIGNMENT,
    CpuArena,
    CudaDriverError,
    MemoryRegion,
    MemorySaver,
    MemoryState,
    MemoryStateError,
    UnknownTagError,
    VirtualRange,
)
from memory_saver.cuda_vmm import AccessDesc, AllocationProp


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def test_arena_hands_out_aligned_typed_views_of_one_block() -> None:
    arena = CpuArena("weights", 4096)
    a = arena.take((3, 5), torch.float32)
    b = arena.take((7,), torch.bfloat16)
    c = arena.take((0, 4), torch.int64)
    assert a.shape == (3, 5) and a.dtype == torch.float32 and b.dtype == torch.bfloat16 and c.numel() == 0
    base = arena.data.data_ptr()
    assert (a.data_ptr() - base, b.data_ptr() - base) == (0, ALIGNMENT)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == base
    a.fill_(1.5)
    b.fill_(2.0)
    assert a.sum().item() == 22.5 and b.float().sum().item() == 14.0  # no overlap between views
    with pytest.raises(MemoryStateError, match="full"):
        arena.take((1024,), torch.float32)


def test_release_frees_storage_and_resume_gives_zeros_without_backup() -> None:
    region = MemoryRegion("kv_cache", "cpu")
    t = region.allocate(1 << 16).take((64, 64), torch.float32)
    t.normal_()
    assert region.nbytes == 1 << 16 and storage_bytes(t) == 1 << 16
    assert region.release() is True
    assert region.state is MemoryState.RELEASED and storage_bytes(t) == 0  # the memory is really gone
    assert region.resume() is True
    assert region.state is MemoryState.ACTIVE and storage_bytes(t) == 1 << 16
    assert torch.count_nonzero(t).item() == 0
    t.fill_(3.0)  # the old view is usable again
    assert t.sum().item() == 3.0 * 64 * 64


def test_backup_restores_exact_contents_across_arenas() -> None:
    region = MemoryRegion("weights", "cpu", backup=True)
    w1 = region.empty((33, 17), torch.bfloat16)
    w2 = region.empty((5,), torch.float64)
    w1.normal_()
    w2.normal_()
    ref1, ref2 = w1.clone(), w2.clone()
    region.release()
    assert storage_bytes(w1) == 0 and storage_bytes(w2) == 0
    region.resume()
    assert torch.equal(w1, ref1) and torch.equal(w2, ref2)
    # A second cycle (the backup is taken again, from the current contents).
    w2.add_(1.0)
    region.release()
    region.resume()
    assert torch.equal(w2, ref2 + 1.0)


def test_double_release_and_resume_are_no_ops() -> None:
    region = MemoryRegion("weights", "cpu", backup=True)
    t = region.empty((8,), torch.float32)
    t.copy_(torch.arange(8.0))
    assert region.release() is True
    assert region.release() is False
    assert region.state is MemoryState.RELEASED
    assert region.resume() is True
    assert region.resume() is False
    assert torch.equal(t, torch.arange(8.0))


def test_misuse_fails_fast_with_a_clear_error() -> None:
    region = MemoryRegion("kv_cache", "cpu")
    arena = region.allocate(1024)
    region.release()
    with pytest.raises(MemoryStateError, match="kv_cache.*released.*resume"):
        region.allocate(1024)
    with pytest.raises(MemoryStateError, match="resume it first"):
        arena.take((4,), torch.float32)
    region.resume()
    region.close()
    assert region.state is MemoryState.CLOSED and arena.state is MemoryState.CLOSED
    with pytest.raises(MemoryStateError, match="closed"):
        region.resume()
    with pytest.raises(MemoryStateError, match="closed"):
        arena.release()
    with pytest.raises(ValueError, match="nbytes"):
        MemoryRegion("weights", "cpu").allocate(0)


def test_saver_releases_by_tag_and_rejects_unknown_tags() -> None:
    saver = MemorySaver("cpu", ("weights", "kv_cache", "cuda_graph"), backup_tags=["weights"])
    w = saver.region("weights").empty((16,), torch.float32)
    kv = saver.region("kv_cache").empty((32,), torch.float32)
    w.fill_(7.0)
    assert saver.release(["kv_cache", "kv_cache"]) == ["kv_cache"]
    assert saver.released_tags() == ["kv_cache"] and storage_bytes(kv) == 0 and storage_bytes(w) > 0
    assert saver.release() == ["weights", "cuda_graph"]  # None: all; kv_cache was released already
    states = saver.states()
    assert states["weights"] == {"state": "released", "bytes": saver.region("weights").nbytes, "backup": True}
    assert states["kv_cache"]["backup"] is False and states["cuda_graph"]["bytes"] == 0
    assert saver.resume(["weights"]) == ["weights"] and torch.equal(w, torch.full((16,), 7.0))
    assert saver.resume() == ["kv_cache", "cuda_graph"] and saver.released_tags() == []
    with pytest.raises(UnknownTagError, match="'activations'"):
        saver.release(["weights", "activations"])
    assert saver.released_tags() == []  # validated before anything changed
    with pytest.raises(UnknownTagError, match="'bogus'"):
        saver.region("bogus")
    with pytest.raises(UnknownTagError, match="'optimizer'"):
        MemorySaver("cpu", ("weights", "kv_cache", "cuda_graph"), backup_tags=["optimizer"])


class FakeDriver:
    """Records VMM calls; physical memory is a counter, addresses come from a bump pointer."""

    name = "fake"

    def __init__(self, granularity: int = 1 << 21, fail: str | None = None) -> None:
        self.gran = granularity
        self.fail = fail
        self.calls: list[tuple] = []
        self.mapped: dict[int, int] = {}  # ptr -> handle
        self.live_handles: set[int] = set()
        self.reserved: dict[int, int] = {}
        self._next_ptr = 1 << 40
        self._next_handle = 1

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if self.fail == name:
            raise CudaDriverError(name, "CUDA_ERROR_OUT_OF_MEMORY")

    def granularity(self, device: int) -> int:
        return self.gran

    def reserve(self, size: int, alignment: int) -> int:
        self._call("reserve", size, alignment)
        ptr, self._next_ptr = self._next_ptr, self._next_ptr + size
        self.reserved[ptr] = size
        return ptr

    def free_address(self, ptr: int, size: int) -> None:
        self._call("free_address", ptr, size)
        assert self.reserved.pop(ptr) == size and ptr not in self.mapped

    def create(self, size: int, device: int) -> int:
        self._call("create", size, device)
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        self.live_handles.add(handle)
        return handle

    def release_handle(self, handle: int) -> None:
        self._call("release_handle", handle)
        self.live_handles.remove(handle)

    def map(self, ptr: int, size: int, handle: int) -> None:
        self._call("map", ptr, size, handle)
        assert self.reserved[ptr] == size and ptr not in self.mapped
        self.mapped[ptr] = handle

    def set_access(self, ptr: int, size: int, device: int) -> None:
        self._call("set_access", ptr, size, device)
        assert ptr in self.mapped

    def unmap(self, ptr: int, size: int) -> None:
        self._call("unmap", ptr, size)
        del self.mapped[ptr]


def test_virtual_range_maps_again_at_the_same_address() -> None:
    drv = FakeDriver()
    vr = VirtualRange(drv, device=0, nbytes=5 << 20)
    assert vr.nbytes == 6 << 20  # rounded up to the granularity
    ptr = vr.ptr
    for _ in range(3):
        vr.map()
        vr.map()  # no-op when mapped
        assert vr.mapped and drv.mapped.keys() == {ptr} and len(drv.live_handles) == 1
        vr.unmap()
        vr.unmap()  # no-op when unmapped
        assert not vr.mapped and not drv.mapped and not drv.live_handles  # physical memory returned
    names = [c[0] for c in drv.calls]
    assert names.count("reserve") == 1 and names.count("create") == 3 and names.count("set_access") == 3
    assert all(c[1] == ptr for c in drv.calls if c[0] in ("map", "set_access", "unmap"))
    vr.map()
    vr.free()
    assert not drv.reserved and not drv.live_handles
    with pytest.raises(RuntimeError, match="freed"):
        vr.map()


@pytest.mark.parametrize("failing", ["map", "set_access"])
def test_virtual_range_failed_map_leaks_no_physical_memory(failing: str) -> None:
    drv = FakeDriver(fail=failing)
    vr = VirtualRange(drv, device=0, nbytes=1)
    with pytest.raises(CudaDriverError, match=f"{failing} failed: CUDA_ERROR_OUT_OF_MEMORY"):
        vr.map()
    assert not vr.mapped and not drv.live_handles and not drv.mapped


def test_ctypes_structs_match_the_driver_layout() -> None:
    # CUmemAllocationProp: type, requestedHandleTypes, location{type,id}, void*, allocFlags(8 bytes).
    assert ctypes.sizeof(AllocationProp) == 32
    assert AllocationProp.win32HandleMetaData.offset == 16 and AllocationProp.allocFlags.offset == 24
    assert ctypes.sizeof(AccessDesc) == 12


def test_take_backing_moves_the_shadow_memory_behind_the_live_addresses() -> None:
    drv = FakeDriver()
    live = VirtualRange(drv, device=0, nbytes=3 << 20)
    shadow = VirtualRange(drv, device=0, nbytes=3 << 20)
    live.map()
    shadow.map()
    new = drv.mapped[shadow.ptr]
    ptr = live.ptr
    live.take_backing(shadow)
    assert live.ptr == ptr and drv.mapped == {ptr: new}  # the same addresses now show the shadow's memory
    assert drv.live_handles == {new}  # the old weights' memory went back to the driver
    assert shadow.ptr not in drv.reserved and live.ptr in drv.reserved  # the shadow's addresses are free
    assert ("set_access", ptr, live.nbytes, 0) in drv.calls[-5:]  # access is set again for the new mapping
    live.unmap()
    assert not drv.live_handles
    with pytest.raises(RuntimeError, match="mapped"):
        live.take_backing(shadow)


@pytest.mark.parametrize("failing", ["map", "set_access"])
def test_failed_take_backing_leaves_both_ranges_as_they_were(failing: str) -> None:
    drv = FakeDriver()
    live = VirtualRange(drv, device=0, nbytes=1 << 20)
    shadow = VirtualRange(drv, device=0, nbytes=1 << 20)
    live.map()
    shadow.map()
    before = dict(drv.mapped)
    calls = {"n": 0}
    real = getattr(drv, failing)

    def fail_once(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # the first call is the switch's; the restore's must go through
            raise CudaDriverError(failing, "CUDA_ERROR_OUT_OF_MEMORY")
        real(*args)

    setattr(drv, failing, fail_once)
    with pytest.raises(CudaDriverError):
        live.take_backing(shadow)
    assert drv.mapped == before and drv.live_handles == set(before.values())
    assert live.mapped and shadow.mapped


def test_take_backing_refuses_ranges_of_different_sizes() -> None:
    drv = FakeDriver()
    live, shadow = VirtualRange(drv, 0, 1 << 21), VirtualRange(drv, 0, 2 << 21)
    live.map()
    shadow.map()
    with pytest.raises(ValueError, match="differ"):
        live.take_backing(shadow)
    assert len(drv.live_handles) == 2


def test_cpu_arena_adopts_a_shadow_in_place() -> None:
    region = MemoryRegion("weights", "cpu")
    arena = region.allocate(4096)
    w = arena.take((16,), torch.float32)
    w.fill_(1.0)
    shadow = region.shadow(arena)
    assert shadow.nbytes == arena.nbytes and shadow not in region.arenas
    shadow.data[:64].view(torch.float32).fill_(2.0)
    ptr = w.data_ptr()
    arena.adopt(shadow)
    assert w.data_ptr() == ptr and torch.equal(w, torch.full((16,), 2.0))  # the old view reads the new bytes
    assert shadow.state is MemoryState.CLOSED and storage_bytes(shadow.data) == 0
    with pytest.raises(MemoryStateError):
        arena.adopt(shadow)
    with pytest.raises(MemoryStateError, match="shadow"):
        arena.adopt(CpuArena("weights", 512))
