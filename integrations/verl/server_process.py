"""The ``rollout serve`` process behind one verl replica: its command line, start, address, stop.

The server runs as its own process (not inside the Ray actor) so the engine's threads, CUDA
context and memory release never share a process with Ray's. It binds loopback: the only
callers are the replica's server actor and the trainer-side adapter, both on the same node.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rollout.errors import InvalidArgumentError, UnavailableError, quoted

logger = logging.getLogger(__name__)

READY_PREFIX = "rollout server listening on "
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
# engine_kwargs.rollout keys -> flags of `rollout serve` (the options verl's config has no field for).
_ENGINE_FLAGS = {
    "page_size": "--page-size",
    "max_total_tokens": "--max-total-tokens",
    "chunked_prefill_size": "--chunked-prefill-size",
    "engine_stall_timeout": "--engine-stall-timeout",
    "max_request_mb": "--max-request-mb",
    "seed": "--seed",
    "log_level": "--log-level",
}
_KEPT_LINES = 40  # the end of the server's output, quoted when it fails to start


@dataclass(frozen=True)
class ServerOptions:
    """How to start ``rollout serve`` for one replica."""

    model_path: str
    device: str = "cpu"
    dtype: str = "float32"
    max_running_requests: int | None = None
    max_num_batched_tokens: int | None = None
    context_length: int | None = None
    tp_size: int = 1  # tensor-parallel ranks: the replica's GPUs, visible to the server
    engine_flags: tuple[tuple[str, str], ...] = field(default=())

    def argv(self) -> list[str]:
        """The command line (run with this interpreter)."""
        args = [sys.executable, "-m", "rollout", "serve", "--model", self.model_path, "--host", "127.0.0.1",
                "--port", "0", "--device", self.device, "--dtype", self.dtype]
        if self.max_running_requests is not None:
            args += ["--max-running-requests", str(self.max_running_requests)]
        if self.max_num_batched_tokens is not None:
            args += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.context_length is not None:
            args += ["--context-length", str(self.context_length)]
        if self.tp_size != 1:
            args += ["--tp-size", str(self.tp_size)]
        for flag, value in self.engine_flags:
            args += [flag, value]
        return args


def server_options(model_path: str, rollout_config: Any, device: str) -> ServerOptions:
    """``ServerOptions`` from verl's rollout config (``dtype``, ``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``tensor_model_parallel_size`` and
    ``engine_kwargs.rollout``)."""
    dtype = str(getattr(rollout_config, "dtype", "bfloat16"))
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"must be one of {sorted(_DTYPES)}, got {quoted(dtype)}", field="rollout.dtype")
    engine_kwargs = getattr(rollout_config, "engine_kwargs", None) or {}
    ours: Mapping[str, Any] = engine_kwargs.get("rollout", None) or {}
    flags = []
    for key, value in ours.items():
        if key not in _ENGINE_FLAGS:
            raise InvalidArgumentError(f"unknown option; known: {sorted(_ENGINE_FLAGS)}",
                                       field=f"engine_kwargs.rollout.{key}")
        flags.append((_ENGINE_FLAGS[key], str(value)))
    return ServerOptions(
        model_path=model_path,
        device=device,
        dtype=_DTYPES[dtype],
        max_running_requests=getattr(rollout_config, "max_num_seqs", None),
        max_num_batched_tokens=getattr(rollout_config, "max_num_batched_tokens", None),
        context_length=getattr(rollout_config, "max_model_len", None),
        tp_size=int(getattr(rollout_config, "tensor_model_parallel_size", 1) or 1),
        engine_flags=tuple(flags),
    )


def _die_with_parent() -> None:
    # Ray ends an actor's process with SIGKILL, which leaves no chance to stop the server; the
    # kernel sends it SIGTERM instead when its parent dies (Linux), so no server outlives its actor.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ServerProcess:
    """A started ``rollout serve``; its output goes to this module's logger."""

    def __init__(self, options: ServerOptions, env: Mapping[str, str] | None = None) -> None:
        self._proc = subprocess.Popen(
            options.argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ if env is None else env), preexec_fn=_die_with_parent)
        self._tail: collections.deque[str] = collections.deque(maxlen=_KEPT_LINES)
        self._address: str | None = None
        self._ready = threading.Event()
        # The pipe is drained for the server's whole life: a full pipe would block its logging.
        self._reader = threading.Thread(target=self._read, name="rollout-serve-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            self._tail.append(line)
            if self._address is None and line.startswith(READY_PREFIX):
                self._address = line[len(READY_PREFIX):].split()[0]
                self._ready.set()
            logger.info("[rollout serve %d] %s", self._proc.pid, line)
        self._ready.set()  # the process ended: wake a waiter, which sees no address

    def wait_address(self, timeout: float) -> str:
        """Block until the server listens; its "host:port". ``UnavailableError`` if it exits or
        does not listen within ``timeout`` seconds (the server is then stopped)."""
        self._ready.wait(timeout)
        if self._address is not None:
            return self._address
        code = self._proc.poll()
        self.stop()
        what = f"exited with code {code}" if code is not None else f"did not listen within {timeout:.0f} s"
        tail = "\n".join(self._tail)
        raise UnavailableError(f"rollout serve {what}; its last output:\n{tail}")

    def alive(self) -> bool:
        """True while the process runs."""
        return self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
