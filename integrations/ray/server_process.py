"""One ``rollout serve`` subprocess: its command line, its log, the address it bound, its stop.

Only the public command line is used (``python -m rollout serve --port 0 ...`` and the line
``rollout server listening on HOST:PORT`` it prints), so this keeps working however the engine's
packages are arranged inside.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import rollout
from rollout.errors import EngineDeadError, InvalidArgumentError

_LISTENING = re.compile(r"rollout server listening on (\S+):(\d+)")
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
_DEVICES = ("cpu", "cuda")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RolloutServerConfig:
    """How a replica's server is started: the model and the ``rollout serve`` options.

    ``host`` is the address the server binds. The default (loopback) serves clients on the same node
    only; bind ``"0.0.0.0"`` for clients on other nodes, and the replica advertises its node's IP.
    ``extra_args`` are further ``rollout serve`` flags, e.g. ``("--page-size", "16")``.
    """

    model: str
    device: str = "cpu"
    dtype: str | None = None
    max_total_tokens: int | None = None
    host: str = "127.0.0.1"
    auth_token: str | None = None
    extra_args: tuple[str, ...] = ()
    start_timeout_s: float = 300.0
    log_dir: str | None = None  # None: a fresh temporary directory per server

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not isinstance(self.model, str) or not self.model:
            raise InvalidArgumentError("must be a model directory", field="model")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in _DEVICES:
            raise InvalidArgumentError(f"must be cpu, cuda or cuda:N (got {self.device!r})", field="device")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise InvalidArgumentError(f"must be one of {_DTYPES} (got {self.dtype!r})", field="dtype")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise InvalidArgumentError("must be >= 1", field="max_total_tokens")
        if self.start_timeout_s <= 0:
            raise InvalidArgumentError("must be > 0", field="start_timeout_s")
        if any(not isinstance(a, str) for a in self.extra_args):
            raise InvalidArgumentError("must be strings", field="extra_args")

    def command(self) -> list[str]:
        """The ``rollout serve`` command line of this config (the port is picked by the server)."""
        cmd = [sys.executable, "-m", "rollout", "serve", "--model", self.model, "--host", self.host,
               "--port", "0", "--device", self.device]
        if self.dtype is not None:
            cmd += ["--dtype", self.dtype]
        if self.max_total_tokens is not None:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        if self.auth_token is not None:
            cmd += ["--auth-token", self.auth_token]
        return cmd + list(self.extra_args)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when its parent dies.

    A Ray actor killed with ``ray.kill`` gets no chance to stop its server; without this the server
    (and the accelerator memory it holds) would outlive it.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the actor's own shutdown is the only stop


class ServerProcess:
    """A started ``rollout serve`` subprocess. ``wait_address`` blocks until it has bound its port."""

    def __init__(self, config: RolloutServerConfig, env: dict[str, str] | None = None) -> None:
        self.config = config
        log_dir = config.log_dir or tempfile.mkdtemp(prefix="rollout-replica-")
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"server-{os.getpid()}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "w")
        full_env = {**os.environ, **(env or {})}
        # The server must run the same rollout package as this process, installed or not.
        root = os.path.dirname(os.path.dirname(os.path.abspath(rollout.__file__)))
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(config.command(), stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.port: int | None = None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def poll_port(self) -> int | None:
        """The bound port once the server printed it; raises ``EngineDeadError`` if the server exited."""
        if self.port is None:
            with open(self.log_path, errors="replace") as f:
                m = _LISTENING.search(f.read())
            if m:
                self.port = int(m.group(2))
            elif self.proc.poll() is not None:
                raise EngineDeadError(f"rollout serve exited with code {self.proc.returncode}:\n{self.log_tail()}")
        return self.port

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server aborts running requests and stops its engine), SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
