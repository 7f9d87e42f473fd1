"""Flat multi-dtype buckets: packing, unpacking, size limits, and the wire form of their layout."""

from __future__ import annotations

import pytest
import torch

from rollout.errors import InvalidArgumentError
from weight_sync.buckets import (
    ALIGN,
    LayoutCache,
    WireLayout,
    bucket_views,
    layouts_from_args,
    layouts_to_args,
    pack_bucket,
    pipeline_order,
    plan_buckets,
    unpack_bucket,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64]


def random_tensors(seed: int, count: int = 40) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=gen))]
        shape = tuple(int(d) for d in torch.randint(1, 9, (int(torch.randint(0, 4, (1,), generator=gen)),),
                                                    generator=gen))
        if dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        else:
            t = torch.randint(-100, 100, shape, generator=gen).to(dtype)
        out[f"layer.{i}.{str(dtype).removeprefix('torch.')}"] = t
    out["empty"] = torch.empty(0, 3, dtype=torch.bfloat16)
    out["scalar"] = torch.tensor(3.5, dtype=torch.float16)
    return out


def pack_all(tensors: dict[str, torch.Tensor], bucket_bytes: int):
    layouts = plan_buckets(((n, t.dtype, t.shape) for n, t in tensors.items()), bucket_bytes)
    items = list(tensors.values())
    buffers, start = [], 0
    for layout in layouts:
        buffers.append(pack_bucket(layout, items[start:start + len(layout.tensors)]))
        start += len(layout.tensors)
    return layouts, buffers


@pytest.mark.parametrize("bucket_bytes", [64, 1000, 1 << 20])
def test_round_trip_of_mixed_dtypes(bucket_bytes: int) -> None:
    tensors = random_tensors(seed=bucket_bytes)
    layouts, buffers = pack_all(tensors, bucket_bytes)
    assert [t.name for lay in layouts for t in lay.tensors] == list(tensors)  # order kept
    got: dict[str, torch.Tensor] = {}
    for layout, buf in zip(layouts, buffers):
        assert buf.dtype == torch.uint8 and buf.numel() == layout.nbytes
        got.update(unpack_bucket(layout, buf))
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_offsets_are_aligned_and_do_not_overlap() -> None:
    layouts, _ = pack_all(random_tensors(seed=1), 1 << 20)
    assert len(layouts) == 1
    spans = sorted((t.offset, t.end) for t in layouts[0].tensors)
    assert all(off % ALIGN == 0 for off, _ in spans)
    assert all(a_end <= b_off for (_, a_end), (b_off, _) in zip(spans, spans[1:]))


def test_bucket_size_limit_and_oversized_tensor() -> None:
    tensors = {f"t{i}": torch.zeros(100, dtype=torch.float32) for i in range(10)}  # 400 bytes each
    tensors["big"] = torch.zeros(1000, dtype=torch.float32)  # 4000 bytes, more than a bucket
    tensors["after"] = torch.zeros(10, dtype=torch.float32)
    layouts = plan_buckets(((n, t.dtype, t.shape) for n, t in tensors.items()), bucket_bytes=1024)
    for layout in layouts:
        assert layout.nbytes <= 1024 or len(layout.tensors) == 1
    (big,) = [lay for lay in layouts if any(t.name == "big" for t in lay.tensors)]
    assert [t.name for t in big.tensors] == ["big"] and big.nbytes == 4000
    # 400-byte tensors at 256-byte alignment: offsets 0 and 512 fit in 1024, a third would not.
    assert [len(lay.tensors) for lay in layouts] == [2, 2, 2, 2, 2, 1, 1]


def test_views_share_the_buffer() -> None:
    layouts, buffers = pack_all({"a": torch.ones(4), "b": torch.ones(2, dtype=torch.bfloat16)}, 1 << 20)
    (name, view), _ = bucket_views(layouts[0], buffers[0])
    view.fill_(7.0)
    assert name == "a" and torch.equal(unpack_bucket(layouts[0], buffers[0])["a"], torch.full((4,), 7.0))


def test_pack_rejects_a_tensor_that_does_not_match_the_layout() -> None:
    layouts = plan_buckets([("w", torch.float32, (2, 3))], 1 << 20)
    with pytest.raises(InvalidArgumentError, match="w"):
        pack_bucket(layouts[0], [torch.zeros(3, 2)])
    with pytest.raises(InvalidArgumentError, match="w"):
        pack_bucket(layouts[0], [torch.zeros(2, 3, dtype=torch.float16)])


def test_wire_form_round_trip() -> None:
    tensors = random_tensors(seed=3)
    layouts, _ = pack_all(tensors, 512)
    args = layouts_to_args(layouts)
    assert all(isinstance(v, list) for v in args.values())
    assert layouts_from_args(**args) == layouts
    # Without explicit offsets the packing rule gives the same offsets.
    rebuilt = layouts_from_args(args["names"], args["dtypes"], args["shapes"], bucket_sizes=args["bucket_sizes"])
    assert rebuilt == layouts


def test_wire_form_defaults_flat_and_per_tensor() -> None:
    names, dtypes, shapes = ["a", "b"], ["float32", "bfloat16"], [[3], [2, 2]]
    flat = layouts_from_args(names, dtypes, shapes, flat_bucket=True)
    assert len(flat) == 1 and [t.offset for t in flat[0].tensors] == [0, ALIGN]
    per_tensor = layouts_from_args(names, dtypes, shapes)
    assert [[t.offset for t in lay.tensors] for lay in per_tensor] == [[0], [0]]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(names=["a"], dtypes=["complex64"], shapes=[[1]]), "dtypes[a]"),
        (dict(names=["a"], dtypes=["float32"], shapes=[[-1]]), "shapes[a]"),
        (dict(names=["a", "a"], dtypes=["float32"] * 2, shapes=[[1]] * 2), "a"),
        (dict(names=["a"], dtypes=["float32", "float32"], shapes=[[1]]), "dtypes"),
        (dict(names=["a"], dtypes=["float32"], shapes=[[1]], offsets=[2]), "offsets[a]"),
        (dict(names=["a", "b"], dtypes=["float32"] * 2, shapes=[[1]] * 2, bucket_sizes=[1, 2]), "bucket_sizes"),
        (dict(names=["a"], dtypes=["float32"], shapes=[["x"]]), "shapes[a]"),
    ],
)
def test_wire_form_rejects_bad_fields(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        layouts_from_args(**kwargs)
    assert info.value.field == field


def test_layout_cache_reparses_whenever_the_wire_form_changes() -> None:
    tensors = random_tensors(seed=5)
    layouts, _ = pack_all(tensors, 512)
    args = layouts_to_args(layouts)
    cache = LayoutCache()
    assert cache.get(WireLayout(**args)) == layouts
    assert cache.get(WireLayout(**{k: list(v) for k, v in args.items()})) == layouts  # equal lists: the cached layout
    # The caller changes its own lists afterwards: the cache kept a copy, so this is a new layout.
    args["shapes"][0].append(1)
    args["shapes"][0].append(1)
    changed = cache.get(WireLayout(**args))
    assert changed[0].tensors[0].shape == tuple(args["shapes"][0]) != layouts[0].tensors[0].shape
    # Bad input is rejected every time, also right after a good layout was cached.
    args["dtypes"][0] = "complex64"
    for _ in range(2):
        with pytest.raises(InvalidArgumentError):
            cache.get(WireLayout(**args))
    assert cache.get(WireLayout(**layouts_to_args(layouts))) == layouts


def test_cuda_ipc_handle_keeps_all_64_bytes() -> None:
    """A driver handle holds zero bytes; all 64 must travel (they were cut at the first zero)."""
    import ctypes

    from weight_sync.cuda_ipc import HANDLE_BYTES, _Handle, handle_bytes

    raw = bytes([7, 0, 0, 3] * (HANDLE_BYTES // 4))
    handle = _Handle()
    ctypes.memmove(ctypes.addressof(handle), raw, HANDLE_BYTES)
    assert handle_bytes(handle) == raw


def test_edge_buckets_keep_the_first_and_last_small() -> None:
    # An 8B-like order: a big embedding first, layers, a big output embedding last.
    specs = [("embed", torch.bfloat16, (1000, 64))]  # 128000 bytes
    for i in range(6):
        specs += [(f"l{i}.w", torch.bfloat16, (200, 64)), (f"l{i}.norm", torch.float32, (64,))]
    specs += [("norm", torch.float32, (64,)), ("lm_head", torch.bfloat16, (1000, 64))]
    sizes = [torch.empty(0, dtype=d).element_size() * int(torch.Size(s).numel()) for _, d, s in specs]
    edge, bucket = 8192, 65536
    order = pipeline_order(sizes, edge)
    assert sorted(order) == list(range(len(specs)))
    ordered = [specs[i] for i in order]
    assert ordered[-1][0] != "lm_head"  # a big tensor is never last
    # Only small tensors moved; the rest kept their order.
    rest = [n for n, _, _ in ordered if not n.endswith("norm")]
    assert rest == [n for n, _, _ in specs if not n.endswith("norm")]
    layouts = plan_buckets(ordered, bucket, edge_bytes=edge)
    assert [t.name for t in layouts[0].tensors] == ["embed"]  # bigger than the edge: alone
    assert layouts[-1].nbytes <= edge and all(t.name.endswith("norm") for t in layouts[-1].tensors)
    assert all(lay.nbytes <= bucket or len(lay.tensors) == 1 for lay in layouts)
    assert [t.name for lay in layouts for t in lay.tensors] == [n for n, _, _ in ordered]


def test_edge_first_bucket_closes_early_when_tensors_are_small() -> None:
    specs = [(f"t{i}", torch.float32, (256,)) for i in range(40)]  # 1 KiB each
    layouts = plan_buckets(specs, bucket_bytes=16384, edge_bytes=4096)
    assert layouts[0].nbytes <= 4096 and layouts[-1].nbytes <= 4096
    assert max(lay.nbytes for lay in layouts) > 4096  # middle buckets are full size
    assert [t.name for lay in layouts for t in lay.tensors] == [n for n, _, _ in specs]
