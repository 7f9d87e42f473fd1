"""Optional shared-token authentication: every call must carry ``authorization: Bearer <token>``.

Standard health checks (``grpc.health.v1``) stay open so orchestrators can probe the server
without the secret; everything else, reflection included, needs the token.
"""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable

import grpc

AUTH_METADATA_KEY = "authorization"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends to authenticate with ``token``."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def _denying_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that fails with UNAUTHENTICATED."""

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # unreachable; makes this an async generator as streaming handlers must be

    # Requests stay undeserialized: an unauthenticated payload is never parsed.
    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(deny_unary)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary)
    return grpc.unary_stream_rpc_method_handler(deny_stream)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the shared token (compared in constant time) with UNAUTHENTICATED."""

    def __init__(self, token: str, open_method_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        if not token:
            raise ValueError("the auth token must be non-empty")
        self._expected = f"Bearer {token}".encode()
        self._open = open_method_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        sent = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                sent = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(sent, self._expected):
            return await continuation(handler_call_details)
        why = "missing auth token" if not sent else "invalid auth token"
        return _denying_handler(
            await continuation(handler_call_details),
            f"{why}: send metadata '{AUTH_METADATA_KEY}: Bearer <token>'",
        )
