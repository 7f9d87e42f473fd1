"""Attention backend name -> factory. GPU libraries are imported only inside their factory."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from rollout.attention.base import AttentionBackend
from rollout.cache.kv_pool import KVPool
from rollout.errors import InvalidArgumentError, quoted


def _torch_backend(kv_pool: KVPool, deterministic: bool) -> AttentionBackend:
    from rollout.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend(kv_pool, deterministic=deterministic)


def _triton_backend(kv_pool: KVPool, deterministic: bool) -> AttentionBackend:
    from rollout.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(kv_pool, deterministic=deterministic)


def _flashinfer_backend(kv_pool: KVPool, deterministic: bool) -> AttentionBackend:
    if deterministic:
        raise InvalidArgumentError("deterministic mode uses the torch or triton backend", field="attention_backend")
    try:
        import flashinfer  # noqa: F401
    except ImportError as exc:
        raise InvalidArgumentError(
            f"flashinfer is not installed (pip install flashinfer-python): {exc}", field="attention_backend"
        ) from exc
    from rollout.attention.flashinfer_backend import FlashInferBackend

    return FlashInferBackend(kv_pool)


# (pool, deterministic) -> backend; deterministic: a query's result must not depend on the batch.
BACKEND_FACTORIES: dict[str, Callable[[KVPool, bool], AttentionBackend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
    "flashinfer": _flashinfer_backend,
}


def create_attention_backend(name: str, kv_pool: KVPool, deterministic: bool = False) -> AttentionBackend:
    """The attention backend registered as ``name``, over ``kv_pool`` (batch-invariant if ``deterministic``)."""
    factory = BACKEND_FACTORIES.get(name)
    if factory is None:
        raise InvalidArgumentError(
            f"unknown backend {quoted(name)}; known: {sorted(BACKEND_FACTORIES)}", field="attention_backend"
        )
    return factory(kv_pool, deterministic)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken GPU install fails in many ways; it just means "not usable here"
        return False
    return True


def default_attention_backend(device: torch.device | str, deterministic: bool = False) -> str:
    """The fastest backend usable on ``device``: flashinfer (not in deterministic mode), else triton on
    CUDA; torch elsewhere."""
    if torch.device(device).type != "cuda":
        return "torch"
    if not deterministic and _importable("flashinfer"):
        return "flashinfer"
    return "triton" if _importable("triton") else "torch"
