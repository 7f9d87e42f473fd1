"""Launching the gRPC server: engine process, servicer, health, reflection, graceful shutdown.

The server binds its port first and answers health NOT_SERVING while the engine process loads
the model, then SERVING. Health goes back to NOT_SERVING whenever the engine loop has not been ready
for commands for ``engine_stall_timeout`` seconds (a forward or an update that does not end), and
to SERVING when it is again. On SIGTERM or SIGINT it stops taking new work, aborts running requests
(their streams end with reason abort and their partial tokens), lets those streams finish, and
stops the engine process; an engine that does not answer is killed, so the server always exits
within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos import rollout_pb2
from rollout.errors import EngineDeadError, InvalidArgumentError, UnimplementedError, quoted
from rollout.server.auth import TokenAuthInterceptor
from rollout.server.servicer import RolloutServicer, add_to_server

if TYPE_CHECKING:
    from rollout.engine.client import EngineClient, EngineObserver
    from rollout.server.http.serve import HttpServer

logger = logging.getLogger(__name__)

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["Rollout"].full_name  # "rollout.v1.Rollout"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # responses (a long non-streamed sample with top logprobs)
MAX_REQUEST_MB = 64  # default limit on a request: weight-update metadata of the largest MoE fits in a few MB
SHUTDOWN_GRACE_S = 10.0  # how long aborted streams get to deliver their last chunks
ENGINE_WATCH_S = 0.5  # how often the server checks that its engine process is alive and answers
ENGINE_STALL_S = 10.0  # default: health is NOT_SERVING after the engine loop was unready this long
ENGINE_STOP_S = 5.0  # how long a stopping server waits for the engine to acknowledge shutdown


def _server_options(max_request_mb: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_request_mb * 1024 * 1024),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Without this a second server could silently share the port with a running one.
        ("grpc.so_reuseport", 0),
        # The clients ping a silent call (a stream of a paused engine, a long prompt) to find a frozen
        # server: accept pings down to their floor (client_calls.MIN_KEEPALIVE_S) and never answer
        # them with GOAWAY, which would end the streams of a server that is merely quiet.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _credentials(tls_cert: str | None, tls_key: str | None) -> grpc.ServerCredentials | None:
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    if tls_cert is None or tls_key is None:
        return None
    with open(tls_cert, "rb") as f:
        cert = f.read()
    with open(tls_key, "rb") as f:
        key = f.read()
    return grpc.ssl_server_credentials([(key, cert)])


async def _watch(engine: Any, health: health_aio.HealthServicer, stall_s: float) -> None:
    """Keep health in step with the engine (NOT_SERVING while it cannot answer); return when it died."""
    serving = True
    while engine.alive:
        stalled = engine.stalled_for()
        if serving != (stalled < stall_s):
            serving = not serving
            if serving:
                logger.info("the engine answers again")
            else:
                logger.warning("the engine has not been ready for commands for %.1f s: health NOT_SERVING", stalled)
            await _set_health(health, health_pb2.HealthCheckResponse.SERVING if serving
                              else health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(min(ENGINE_WATCH_S, stall_s / 4))


def _http_server(port: int | None, model_name: str | None, host: str, auth_token: str | None,
                 tls_cert: str | None, tls_key: str | None, stall_s: float, max_request_mb: int) -> HttpServer | None:
    """The OpenAI-compatible front end on ``port`` (None: none), its socket bound now."""
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"must be an integer in 0..65535 (got {quoted(port)})", field="http_port")
    from rollout.default_model import DEFAULT_MODEL_NAME

    try:
        from rollout.server.http.app import HttpState
        from rollout.server.http.serve import HttpServer
        from rollout.server.metrics import ServerMetrics
    except ImportError as e:
        raise UnimplementedError(f"--http-port needs the http extra ({e}): pip install 'rollout[http]' "
                                 "(from a checkout: pip install -e '.[http]')") from None

    name = model_name or DEFAULT_MODEL_NAME
    state = HttpState(name, auth_token, ServerMetrics(name), stall_timeout_s=stall_s)
    return HttpServer(state, host, port, max_request_bytes=max_request_mb * 1024 * 1024, grace_s=SHUTDOWN_GRACE_S,
                      tls_cert=tls_cert, tls_key=tls_key)


def _load_engine(model_path: str | None, engine_options: dict[str, Any],
                 observer: EngineObserver | None = None) -> EngineClient:
    """Find the model (the default one, a directory, or a Hub id to fetch) and start its engine process."""
    from rollout.engine.process import start_engine_process
    from rollout.model_source import resolve_model_path

    path = resolve_model_path(model_path)
    if model_path is None:
        logger.info("no --model given: using the embedded default model at %s", path)
    elif path != model_path:
        logger.info("%s is in the Hugging Face cache at %s", model_path, path)
    return start_engine_process(path, observer=observer, **engine_options)


async def _set_health(health: health_aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await health.set(name, status)


async def serve_async(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 50051,
    auth_token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    enable_control: bool = True,
    stop_event: asyncio.Event | None = None,
    engine_stall_timeout: float = ENGINE_STALL_S,
    max_request_mb: int = MAX_REQUEST_MB,
    http_port: int | None = None,
    served_model_name: str | None = None,
    **engine_options: Any,
) -> None:
    """Run the server until ``stop_event`` is set (or SIGTERM / SIGINT when none is given)."""
    if not 0 < engine_stall_timeout < float("inf"):
        raise ValueError(f"engine_stall_timeout must be a positive number of seconds, got {engine_stall_timeout!r}")
    if not isinstance(max_request_mb, int) or not 1 <= max_request_mb <= 2047:
        raise ValueError(f"max_request_mb must be in 1..2047, got {max_request_mb!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        # gRPC would bind some other port for an out-of-range number rather than refuse it.
        raise InvalidArgumentError(f"must be an integer in 0..65535 (got {quoted(port)})", field="port")

    creds = _credentials(tls_cert, tls_key)
    http = _http_server(http_port, served_model_name or model_path, host, auth_token, tls_cert, tls_key,
                        engine_stall_timeout, max_request_mb)
    loop = asyncio.get_running_loop()
    if stop_event is None:
        stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_event.set)

    interceptors = [TokenAuthInterceptor(auth_token)] if auth_token else []
    server = grpc.aio.server(interceptors=interceptors, options=_server_options(max_request_mb))
    servicer = RolloutServicer(enable_control=enable_control)
    add_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    await server.start()
    http_task = asyncio.ensure_future(http.run()) if http is not None else None

    engine = None
    died = False
    try:
        observer = http.state.metrics if http is not None else None
        load = loop.run_in_executor(None, functools.partial(_load_engine, model_path, engine_options, observer))
        stop_wait = asyncio.ensure_future(stop_event.wait())
        await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            logger.info("stop requested while loading; stopping once the model has loaded")
        engine = await load
        if stop_event.is_set():
            return
        servicer.attach(engine)
        if http is not None:
            http.state.engine = engine
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        # The exact form of this line is what scripts wait for (port 0 picks a free port); it comes
        # only once the model is loaded and health is SERVING, never for a server that fails to start.
        print(
            f"rollout server listening on {host}:{bound} ({'TLS' if creds else 'plaintext'}"
            f"{', token auth' if auth_token else ''}{'' if enable_control else ', control disabled'})",
            flush=True,
        )
        if len(engine.pids) > 1:
            logger.info("engine ranks 0..%d run as processes %s", len(engine.pids) - 1,
                        " ".join(map(str, engine.pids)))
        if http is not None:
            print(f"rollout HTTP server (OpenAI API) at {http.url}", flush=True)
        logger.info(
            "serving %s (context %d, %d KV tokens)",
            engine.info.model_path,
            engine.info.context_length,
            engine.info.kv_total_tokens,
        )
        watch = asyncio.ensure_future(_watch(engine, health, engine_stall_timeout))
        await asyncio.wait({stop_wait, watch}, return_when=asyncio.FIRST_COMPLETED)
        died = watch.done()
        watch.cancel()
        if died:
            logger.error("the engine process died; stopping the server")
        else:
            logger.info("shutting down: aborting running requests")
    finally:
        servicer.begin_shutdown()
        if http is not None:
            http.state.shutting_down = True
        await health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(server.stop(SHUTDOWN_GRACE_S))
        if engine is not None:
            if engine.alive and engine.stalled_for() >= min(engine_stall_timeout, ENGINE_STOP_S):
                # It would never end the streams, so the grace would only delay the exit.
                engine.kill(f"the engine has not answered for {engine.stalled_for():.1f} s")
            # Aborted requests send their final chunks; the streams end before the grace runs out.
            engine.abort(None)
        await stopping
        if http is not None and http_task is not None:
            http.stop()  # its streams ended with the abort above
            await asyncio.wait({http_task}, timeout=SHUTDOWN_GRACE_S + 1)
        if engine is not None:
            await loop.run_in_executor(None, functools.partial(engine.shutdown, ENGINE_STOP_S))
        logger.info("server stopped")
    if died:
        raise EngineDeadError("the engine process died while serving; see the log above for its error")


def serve(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 50051,
    auth_token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    enable_control: bool = True,
    engine_stall_timeout: float = ENGINE_STALL_S,
    max_request_mb: int = MAX_REQUEST_MB,
    http_port: int | None = None,
    served_model_name: str | None = None,
    **engine_options: Any,
) -> None:
    """Serve ``rollout.v1.Rollout`` for the model at ``model_path``: a directory, a Hugging Face Hub id
    (fetched into the Hub cache), or None for the embedded default model.

    With ``http_port``, the OpenAI-compatible HTTP API (``rollout.server.http``) is served there too,
    on the same engine, host, token and TLS, under ``served_model_name`` (default: ``model_path``).
    Blocks until SIGTERM or SIGINT. ``engine_options`` go to the engine (device, dtype, page_size,
    max_total_tokens, max_running_requests, chunked_prefill_size, ...). Raises the engine's error
    if the model cannot be loaded, and ``EngineDeadError`` if the engine process dies while serving.
    """
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve_async(
                model_path, host, port, auth_token, tls_cert, tls_key, enable_control,
                engine_stall_timeout=engine_stall_timeout, max_request_mb=max_request_mb, http_port=http_port,
                served_model_name=served_model_name, **engine_options
            )
        )
