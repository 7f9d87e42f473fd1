"""Fixtures of the end-to-end tests: a tiny random model, real server processes, an in-process engine.

The servers are started as ``python -m rollout serve --port 0 ...`` subprocesses; the port they bound
is read from their log. The main server (token auth on) is shared by the whole session.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

from rollout.client import RolloutClient
from tests.waiting import DeadlineClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "e2e-secret-token"
START_TIMEOUT_S = 120.0


class ServerProcess:
    """A ``rollout serve`` subprocess with its log file and bound address."""

    def __init__(self, args: list[str], log_path: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, full_env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rollout", "serve", "--port", "0", *args],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        self.address = self._wait_for_address()
        self._http_url: str | None = None

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = re.search(r"listening on (\S+:\d+)", self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible HTTP API (a server started with --http-port)."""
        if self._http_url is None:
            deadline = time.monotonic() + 10  # printed right after the gRPC line
            while (m := re.search(r"HTTP server \(OpenAI API\) at (\S+)", self.log())) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no HTTP address in the server's log:\n{self.log()}")
                time.sleep(0.05)
            self._http_url = m.group(1)
        return self._http_url

    def wait_ready(self, token: str | None = None) -> None:
        with RolloutClient(self.address, token=token) as c:
            try:
                c.wait_ready(START_TIMEOUT_S)
            except Exception:
                raise RuntimeError(f"server not SERVING:\n{self.log()}") from None

    def children(self) -> list[int]:
        """Pids of the server's child processes (the engine process)."""
        pids: list[int] = []
        task_dir = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(task_dir) if os.path.isdir(task_dir) else ():
            try:
                with open(f"{task_dir}/{tid}/children") as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return pids

    def engine_pid(self) -> int:
        """Pid of the engine process (the spawned child that is not multiprocessing's resource tracker)."""
        found = []
        for pid in self.children():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                found.append(pid)
        assert len(found) == 1, f"expected one engine process, found {found}"
        return found[0]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def token() -> str:
    """The shared server's auth token."""
    return TOKEN


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> str:
    """The default tiny Qwen3 model of the shared fixtures (vocab 384, 2 layers, context 2048)."""
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start a server with extra CLI args; every server still running is stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, token: str | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        log = str(tmp_path_factory.mktemp("server") / "server.log")
        server = ServerProcess(list(args), log, env)
        started.append(server)
        server.wait_ready(token)
        return server

    yield start
    for server in started:
        server.stop()


SERVED_MODEL = "tiny-qwen3"


@pytest.fixture(scope="session")
def server(start_server, tiny_model) -> ServerProcess:
    """The shared server: tiny model, token auth on, the OpenAI-compatible HTTP API beside gRPC."""
    return start_server("--model", tiny_model, "--auth-token", TOKEN, "--http-port", "0",
                        "--served-model-name", SERVED_MODEL, token=TOKEN)


@pytest.fixture(scope="session")
def client(server) -> Iterator[RolloutClient]:
    with DeadlineClient(server.address, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The in-process engine over the same model: the reference the server must agree with."""
    from rollout.engine.api import Engine

    eng = Engine(tiny_model, device="cpu", dtype="float32")
    yield eng
    eng.shutdown()


@pytest.fixture
def idle(client) -> Callable[[], None]:
    """Wait until the server has no request and holds no KV for one (fails after 15 s)."""

    def wait() -> None:
        deadline = time.monotonic() + 15
        while True:
            info = client.get_info()
            if info.num_running == 0 and info.num_waiting == 0 and info.kv_used_tokens == 0:
                return
            leak = " with no request left: KV leaked" if info.num_running == info.num_waiting == 0 else ""
            assert time.monotonic() < deadline, (
                f"the server did not become idle within 15 s: {info.num_running} running, {info.num_waiting} "
                f"waiting, {info.kv_used_tokens} KV tokens in use{leak}")
            time.sleep(0.05)

    return wait
