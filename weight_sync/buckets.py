"""Flat multi-dtype buckets: many tensors packed into one byte buffer, and the layout describing them.

A bucket is a uint8 buffer; tensor ``i`` occupies ``[offset_i, offset_i + nbytes_i)``. The packer
aligns offsets to ``ALIGN`` bytes, so every view is aligned for its dtype (and for vector loads on GPU)::

    | t0 (bf16, 4096x4096) |pad| t1 (f32, 4096) |pad| t2 ... |
    0                          256k                 ...        nbytes

The layout travels as plain parallel lists (names, dtypes, shapes, offsets, bucket_sizes), never as
pickled objects: ``layouts_to_args`` / ``layouts_from_args`` convert both ways and validate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rollout.errors import InvalidArgumentError, quoted

ALIGN = 256  # bytes; a multiple of every dtype's size and of the GPU's widest vector load
DEFAULT_BUCKET_BYTES = 1 << 30

# Dtype names on the wire -> torch dtypes (the names are torch's own, without "torch.").
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
    if hasattr(torch, name)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; raises for dtypes that cannot travel in a bucket."""
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) is not dtype:
        raise InvalidArgumentError(f"dtype {name} cannot be sent; supported: {sorted(DTYPES)}", field="dtype")
    return name


def parse_dtype(name: Any, field: str = "dtypes") -> torch.dtype:
    """The torch dtype of a wire name (``"bfloat16"``; ``"torch.bfloat16"`` is accepted too)."""
    if not isinstance(name, str) or name.removeprefix("torch.") not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {quoted(name)}; supported: {sorted(DTYPES)}", field=field)
    return DTYPES[name.removeprefix("torch.")]


def align_up(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return (n + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a bucket: its name, dtype (wire name), shape and byte offset in the bucket."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True, slots=True)
class BucketLayout:
    """The tensors of one flat bucket and the buffer size that holds them."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: Sequence[TensorSpec]) -> BucketLayout:
        return cls(tuple(tensors), max((t.end for t in tensors), default=0))

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data (``nbytes`` minus the alignment padding)."""
        return sum(t.nbytes for t in self.tensors)


def plan_buckets(
    specs: Iterable[tuple[str, torch.dtype | str, Sequence[int]]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    edge_bytes: int | None = None,
) -> list[BucketLayout]:
    """Greedy packing in the given order: a bucket closes when the next tensor would overflow it.

    Every bucket holds at most ``bucket_bytes`` bytes, except that a tensor larger than that gets a
    bucket of its own. With ``edge_bytes`` the first bucket closes once it holds that much (a
    larger first tensor travels alone), and the trailing tensors that fit in ``edge_bytes`` get the
    last bucket to themselves: the pipeline's fill and drain stay short (see ``pipeline_order``).
    """
    if bucket_bytes <= 0:
        raise InvalidArgumentError("must be > 0", field="bucket_bytes")
    parsed = []
    for name, dtype, shape in specs:
        dname = dtype if isinstance(dtype, str) else dtype_name(dtype)
        parse_dtype(dname)
        parsed.append(TensorSpec(name, dname.removeprefix("torch."), tuple(int(d) for d in shape)))
    tail_start = len(parsed)
    if edge_bytes is not None:
        edge_bytes = min(edge_bytes, bucket_bytes)
        room = edge_bytes
        while tail_start > 1 and align_up(parsed[tail_start - 1].nbytes) <= room:
            tail_start -= 1
            room -= align_up(parsed[tail_start].nbytes)
    buckets: list[BucketLayout] = []
    current: list[TensorSpec] = []
    end = 0
    for i, spec in enumerate(parsed):
        limit = edge_bytes if edge_bytes is not None and not buckets else bucket_bytes
        offset = align_up(end)
        if current and (offset + spec.nbytes > limit or i == tail_start):
            buckets.append(BucketLayout.of(current))
            current, offset = [], 0
        current.append(TensorSpec(spec.name, spec.dtype, spec.shape, offset))
        end = offset + spec.nbytes
    if current:
        buckets.append(BucketLayout.of(current))
    return buckets


def pipeline_order(sizes: Sequence[int], edge_bytes: int) -> list[int]:
    """An order of tensors (by their byte ``sizes``) that keeps the pipeline's last stage short.

    A pipelined push cannot hide the first bucket's packing nor the last bucket's loading on the
    receiver; both scale with those buckets' sizes. This order moves the last tensors of at most
    ``edge_bytes`` each, up to ``edge_bytes`` in all, to the end (so a big tensor such as an output
    embedding is not last); everything else keeps its order. ``plan_buckets(..., edge_bytes=)``
    then closes the first and the last buckets early.
    """
    tail: list[int] = []
    room = edge_bytes
    for i in range(len(sizes) - 1, -1, -1):
        if align_up(sizes[i]) <= room:
            tail.append(i)
            room -= align_up(sizes[i])
    moved = set(tail)
    return [i for i in range(len(sizes)) if i not in moved] + sorted(tail)


def bucket_views(layout: BucketLayout, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, view)`` of every tensor of ``layout`` inside the uint8 ``buffer`` (no copies)."""
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1 and buffer.numel() >= layout.nbytes
    out = []
    for t in layout.tensors:
        raw = buffer[t.offset:t.end]  # (nbytes,) uint8
        out.append((t.name, raw.view(t.torch_dtype).view(t.shape)))
    return out


def pack_bucket(
    layout: BucketLayout,
    tensors: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Copy ``tensors`` (in layout order) into ``out`` or a new uint8 buffer on ``device``.

    Copies into a GPU buffer are asynchronous on the current stream (collectives and IPC readers
    order themselves after it); copies into host memory complete before this returns. Padding bytes
    are left as they are.
    """
    if len(tensors) != len(layout.tensors):
        raise InvalidArgumentError(f"{len(tensors)} tensors for a bucket of {len(layout.tensors)}", field="tensors")
    if out is None:
        dev = device if device is not None else (tensors[0].device if tensors else "cpu")
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=dev)
    for (name, dst), src in zip(bucket_views(layout, out), tensors):
        if src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):
            raise InvalidArgumentError(
                f"expected {dst.dtype} {tuple(dst.shape)}, got {src.dtype} {tuple(src.shape)}", field=name
            )
        dst.copy_(src, non_blocking=dst.is_cuda)
    return out


def unpack_bucket(layout: BucketLayout, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent copies of every tensor of ``layout`` in ``buffer`` (views: ``bucket_views``)."""
    return {name: view.clone() for name, view in bucket_views(layout, buffer)}


# ---------------------------------------------------------------------------------------- wire form
def layouts_to_args(layouts: Sequence[BucketLayout]) -> dict[str, list]:
    """The wire form: parallel lists over all tensors, plus the number of tensors in each bucket."""
    tensors = [t for b in layouts for t in b.tensors]
    return {
        "names": [t.name for t in tensors],
        "dtypes": [t.dtype for t in tensors],
        "shapes": [list(t.shape) for t in tensors],
        "offsets": [t.offset for t in tensors],
        "bucket_sizes": [len(b.tensors) for b in layouts],
    }


def _copied(value: Any) -> Any:
    """A copy of nested lists / tuples of plain values (same container types, so ``==`` still holds)."""
    return type(value)(_copied(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class WireLayout:
    """The wire form of a push's bucket layouts, as a trainer sends it (see ``layouts_to_args``).

    Parallel lists over all tensors; ``bucket_sizes`` splits them into buckets (without it,
    ``flat_bucket`` puts them all in one, else each travels alone); without ``offsets`` each bucket
    is packed by the rule of ``plan_buckets``. Nothing is validated here: ``layouts_from_args`` does
    that when the engine reads it.
    """

    names: Any
    dtypes: Any
    shapes: Any
    offsets: Any = None
    bucket_sizes: Any = None
    flat_bucket: bool = False


class LayoutCache:
    """``layouts_from_args`` that remembers the last layout it parsed.

    A trainer pushes the same layout every step; parsing and validating a few hundred tensors costs
    milliseconds that would sit between the trainer's call and the first byte on the wire, while
    comparing the wire form with the last one costs microseconds. The cache keeps its own copy of
    that wire form, so a caller mutating its lists afterwards cannot make a stale layout match.
    """

    def __init__(self) -> None:
        self._last: tuple[list[Any], list[BucketLayout]] | None = None

    def get(self, wire: WireLayout) -> list[BucketLayout]:
        """The layouts of ``wire`` (see ``layouts_from_args``), validated."""
        fields = [wire.names, wire.dtypes, wire.shapes, wire.offsets, wire.bucket_sizes, wire.flat_bucket]
        if self._last is not None and self._last[0] == fields:
            return list(self._last[1])
        layouts = layouts_from_args(*fields[:5], bool(fields[5]))
        self._last = (_copied(fields), layouts)
        return list(layouts)


def _int_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidArgumentError("must be a list of integers", field=field)
    return list(value)


def layouts_from_args(
    names: Any,
    dtypes: Any,
    shapes: Any,
    offsets: Any = None,
    bucket_sizes: Any = None,
    flat_bucket: bool = False,
) -> list[BucketLayout]:
    """Rebuild bucket layouts from the wire form, validating every field.

    ``bucket_sizes`` splits the tensors (in order) into buckets; without it, ``flat_bucket`` puts
    them all in one bucket, else each tensor travels alone. Without ``offsets`` each bucket is
    packed by the rule of ``plan_buckets``.
    """
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise InvalidArgumentError("must be a list of non-empty strings", field="names")
    if not isinstance(dtypes, (list, tuple)) or len(dtypes) != len(names):
        raise InvalidArgumentError(f"must have one entry per name ({len(names)})", field="dtypes")
    if not isinstance(shapes, (list, tuple)) or len(shapes) != len(names):
        raise InvalidArgumentError(f"must have one entry per name ({len(names)})", field="shapes")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise InvalidArgumentError("a tensor name appears twice", field=dup)
    specs = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        torch_dtype = parse_dtype(dtype, field=f"dtypes[{name}]")
        dims = _int_list(shape, f"shapes[{name}]")
        if any(d < 0 for d in dims):
            raise InvalidArgumentError(f"negative dimension in {dims}", field=f"shapes[{name}]")
        specs.append(TensorSpec(name, dtype_name(torch_dtype), tuple(dims)))
    if bucket_sizes is not None and len(bucket_sizes) > 0:
        sizes = _int_list(bucket_sizes, "bucket_sizes")
        if any(s <= 0 for s in sizes) or sum(sizes) != len(names):
            raise InvalidArgumentError(f"must be positive and sum to the {len(names)} tensors", field="bucket_sizes")
    elif flat_bucket:
        sizes = [len(names)] if names else []
    else:
        sizes = [1] * len(names)
    if offsets is not None and len(offsets) > 0:
        offs = _int_list(offsets, "offsets")
        if len(offs) != len(names):
            raise InvalidArgumentError(f"must have one entry per name ({len(names)})", field="offsets")
        for spec, off in zip(specs, offs):
            if off < 0 or off % spec.torch_dtype.itemsize:
                raise InvalidArgumentError(f"offset {off} is negative or not a multiple of the {spec.dtype} size",
                                           field=f"offsets[{spec.name}]")
    else:
        offs = []
        for size in sizes:
            end = 0
            for spec in specs[len(offs):len(offs) + size]:
                offs.append(align_up(end))
                end = offs[-1] + spec.nbytes
    layouts, i = [], 0
    for size in sizes:
        layouts.append(BucketLayout.of([
            TensorSpec(s.name, s.dtype, s.shape, o) for s, o in zip(specs[i:i + size], offs[i:i + size])
        ]))
        i += size
    return layouts
