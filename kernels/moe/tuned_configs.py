"""Tuned MoE tiles per shape and device: JSON files written by ``python -m kernels.moe.tune``.

One file per (experts E, expert width N, hidden H, dtype, device), kept in ``kernels/moe/configs/``
(or in the directory named by ``$ROLLOUT_MOE_CONFIG_DIR``, which replaces it)::

    E=128,N=768,H=2048,dtype=bfloat16,device=NVIDIA_H200.json
    {"format": 1, "top_k": 8, "device": "NVIDIA H200", ...,
     "configs": {"1":  {"block_m": 16, "gate_up": {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3},
                                       "down":    {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3}},
                 "64": {...}, ...}}

N is the width each rank holds (the full expert width over the tensor-parallel size), E the experts
stacked on this rank. Keys of ``configs`` are the token counts the tuner timed, with the file's
``top_k``. A call is matched by rows, the (token, expert) pairs the kernels see: entry rows are
``tokens * top_k`` and the call takes the entry whose rows are nearest on a log scale (by ratio; the
larger entry on a tie). Rows rather than tokens because the best tiles follow the rows per expert,
so a model with the same E, N, H and another top-k reads the file correctly. Entries may carry more
keys (the tuner adds its timings); they are ignored here.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from kernels.moe.config import GemmTiles, MoeKernelConfig

CONFIG_DIR_ENV = "ROLLOUT_MOE_CONFIG_DIR"
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FORMAT = 1
_POW2 = {1 << i for i in range(4, 10)}  # 16 .. 512: tl.dot needs tiles of at least 16


@dataclass(frozen=True, slots=True)
class TunedTable:
    """The tuned configs of one file, ordered by rows."""

    top_k: int
    rows: tuple[int, ...]  # ascending; tokens * top_k of each entry
    configs: tuple[MoeKernelConfig, ...]

    def nearest(self, num_rows: int) -> MoeKernelConfig:
        """The config of the entry whose rows are nearest ``num_rows`` by ratio (the larger on a tie)."""
        i = bisect.bisect_left(self.rows, num_rows)
        if i == len(self.rows):
            return self.configs[-1]
        if i == 0 or self.rows[i] == num_rows:
            return self.configs[i]
        lo, hi = self.rows[i - 1], self.rows[i]
        return self.configs[i] if hi * lo <= num_rows * num_rows else self.configs[i - 1]


def config_file_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str) -> str:
    """``E=..,N=..,H=..,dtype=..,device=...json``; characters of the device name other than letters,
    digits, ``-`` and ``.`` become ``_`` ("NVIDIA H200" -> "NVIDIA_H200")."""
    dtype_name = str(dtype).removeprefix("torch.")
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", device)
    return f"E={num_experts},N={inter},H={hidden},dtype={dtype_name},device={safe}.json"


@cache
def device_name(device: torch.device) -> str:
    """The GPU's marketing name ("NVIDIA H200"), or the device type ("cpu") off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def config_dir() -> Path:
    """``$ROLLOUT_MOE_CONFIG_DIR`` when set, else the package's ``kernels/moe/configs``."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else PACKAGE_CONFIG_DIR


def _tiles_json(t: GemmTiles) -> dict[str, int]:
    return {"block_n": t.block_n, "block_k": t.block_k, "num_warps": t.num_warps, "num_stages": t.num_stages}


def config_to_json(cfg: MoeKernelConfig) -> dict[str, Any]:
    """One entry of a config file."""
    return {"block_m": cfg.block_m, "gate_up": _tiles_json(cfg.gate_up), "down": _tiles_json(cfg.down)}


def _int(entry: dict[str, Any], key: str, allowed: set[int] | range, where: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not one of {sorted(allowed)}")
    return value


def _tiles_from_json(entry: Any, where: str) -> GemmTiles:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {entry!r}")
    return GemmTiles(
        block_n=_int(entry, "block_n", _POW2, where),
        block_k=_int(entry, "block_k", _POW2, where),
        num_warps=_int(entry, "num_warps", {1, 2, 4, 8, 16}, where),
        num_stages=_int(entry, "num_stages", range(1, 9), where),
    )


def config_from_json(entry: Any, where: str = "config") -> MoeKernelConfig:
    """Parse and check one entry (tiles are powers of two from 16 to 512); ValueError names ``where``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {entry!r}")
    block_m = _int(entry, "block_m", {16, 32, 64, 128, 256}, where)
    return MoeKernelConfig(block_m, _tiles_from_json(entry.get("gate_up"), f"{where}.gate_up"),
                           _tiles_from_json(entry.get("down"), f"{where}.down"))


def save_table(path: Path, top_k: int, configs: dict[int, MoeKernelConfig],
               extra: dict[int, dict[str, Any]] | None = None, meta: dict[str, Any] | None = None) -> None:
    """Write ``configs`` (token count -> config) as a config file; ``extra`` adds keys to entries and
    ``meta`` to the top level. Written to a temporary file and renamed, so readers never see half."""
    extra = extra or {}
    head = {"format": FORMAT, "top_k": top_k, **(meta or {})}
    entries = [f'  "{t}": {json.dumps({**config_to_json(c), **extra.get(t, {})})}' for t, c in sorted(configs.items())]
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]  # one entry a line: readable diffs
    text = "{\n" + "\n".join(lines) + '\n "configs": {\n' + ",\n".join(entries) + "\n }\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_table(path: Path) -> TunedTable:
    """Read and check a config file; any malformed part raises ValueError naming the file."""
    try:
        body = json.loads(Path(path).read_text())
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        top_k = body.get("top_k")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} is not a positive integer")
        entries = body.get("configs")
        if not isinstance(entries, dict) or not entries:
            raise ValueError("no configs")
        parsed = []
        for key, entry in entries.items():
            if not key.isdigit() or int(key) < 1:
                raise ValueError(f"token count {key!r} is not a positive integer")
            parsed.append((int(key) * top_k, config_from_json(entry, f"configs[{key}]")))
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"bad MoE config file {path}: {exc}") from exc
    parsed.sort(key=lambda p: p[0])
    return TunedTable(top_k, tuple(r for r, _ in parsed), tuple(c for _, c in parsed))


@cache
def _table_for(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: torch.device,
               folder: str) -> TunedTable | None:
    """The table of this shape's file in ``folder``, read once per process; None without a file."""
    path = Path(folder) / config_file_name(num_experts, inter, hidden, dtype, device_name(device))
    return load_table(path) if path.is_file() else None


def tuned_config(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 num_rows: int, directory: Path | None = None) -> MoeKernelConfig | None:
    """The tuned config for ``num_rows`` rows of this shape on ``device``, or None without a file.

    ``directory`` defaults to ``config_dir()``. Each file is looked up and read once per process (a
    file that appears later is not seen); a call then costs a dictionary lookup and a bisection."""
    folder = str(directory if directory is not None else config_dir())
    table = _table_for(num_experts, inter, hidden, dtype, device, folder)
    return None if table is None else table.nearest(num_rows)
