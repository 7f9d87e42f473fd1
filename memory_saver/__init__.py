"""GPU memory that can be released and resumed at the same virtual addresses.

``MemorySaver(device, tags, backup_tags=...)`` holds one ``MemoryRegion`` per tag the caller names
(the engine's: ``weights``, ``kv_cache``, ``cuda_graph``); the engine allocates arenas from a region
and takes tensors from them. ``release(tags)`` gives the physical memory back to the driver while
the virtual addresses stay reserved; ``resume(tags)`` maps new memory at the same addresses (and
restores a host backup where the tag has one). On CPU the same API frees and re-allocates the storage.
``region.shadow(arena)`` is a second arena of the same size, and ``arena.adopt(shadow)`` moves the
shadow's memory behind the arena's addresses (CUDA: an unmap and a map, no copy): the switch of a
zero-pause weight update.
"""

from memory_saver.arena import Arena, CpuArena, CudaArena, tensor_over
from memory_saver.cuda_vmm import CtypesDriver, CudaPythonDriver, VirtualRange, VmmDriver, load_driver
from memory_saver.region import MemoryRegion, MemorySaver
from memory_saver.state import (
    ALIGNMENT,
    CudaDriverError,
    MemorySaverError,
    MemoryState,
    MemoryStateError,
    UnknownTagError,
    align_up,
)

__all__ = [
    "ALIGNMENT", "Arena", "CpuArena", "CtypesDriver", "CudaArena", "CudaDriverError", "CudaPythonDriver",
    "MemoryRegion", "MemorySaver", "MemorySaverError", "MemoryState", "MemoryStateError", "UnknownTagError",
    "VirtualRange", "VmmDriver", "align_up", "load_driver", "tensor_over",
]
