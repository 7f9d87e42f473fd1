"""Running the HTTP front end inside the gRPC server's event loop, with uvicorn.

The socket is bound when the server is built (a port in use fails the start at once; port 0 picks a
free one and ``port`` tells which), and requests are answered from then on: 503 until the engine is
attached. uvicorn's own signal handling is left out: the gRPC server's handlers stop both.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

import uvicorn

from rollout.server.http.app import HttpState, build_app


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host (it would otherwise take SIGINT / SIGTERM
    and raise them again when it stops)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot serve HTTP on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """The OpenAI-compatible front end on ``host:port`` (TLS with the gRPC server's certificate)."""

    def __init__(self, state: HttpState, host: str, port: int, *, max_request_bytes: int, grace_s: float,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        self.state = state
        self.tls = tls_cert is not None
        self._sock = _bind(host, port)
        self.port = self._sock.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://{host}:{self.port}"
        config = uvicorn.Config(build_app(state, max_request_bytes), lifespan="off", log_config=None,
                                access_log=False, timeout_graceful_shutdown=max(1, int(grace_s)),
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        self._server = _EmbeddedServer(config)

    async def run(self) -> None:
        """Serve until ``stop``."""
        await self._server.serve(sockets=[self._sock])

    def stop(self) -> None:
        """Stop taking connections; open ones get ``grace_s`` to finish."""
        self.state.shutting_down = True
        self._server.should_exit = True
