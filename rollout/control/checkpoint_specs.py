"""Names, dtypes and shapes of a safetensors checkpoint, read from its headers (no tensor data)."""

from __future__ import annotations

import torch
from safetensors import SafetensorError, safe_open

from rollout.errors import InvalidArgumentError
from rollout.models.loader import checkpoint_files

# safetensors header dtype -> torch dtype
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


def checkpoint_specs(model_path: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every tensor of the checkpoint at ``model_path``."""
    specs = []
    for path in checkpoint_files(model_path):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise InvalidArgumentError(f"unsupported dtype {sl.get_dtype()}", field=name)
                    specs.append((name, dtype, tuple(sl.get_shape())))
        except SafetensorError as e:  # a corrupt or truncated file: the caller's input, read before any write
            raise InvalidArgumentError(f"{path} is not a readable safetensors file: {e}", field="model_path") from e
    return specs
