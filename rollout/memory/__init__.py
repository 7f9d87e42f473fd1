"""Engine-side use of ``memory_saver``: where the model's weights and the KV pool are allocated."""

from rollout.memory.engine_memory import EngineMemory

__all__ = ["EngineMemory"]
