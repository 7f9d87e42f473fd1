"""The FastAPI application of the HTTP front end: routes, bearer auth, body limit, OpenAI errors.

Answers mirror the gRPC service: UNAVAILABLE (503) while the model loads and after shutdown began,
UNAUTHENTICATED (401) without the shared token (``/health`` stays open, as gRPC health does),
the engine's own typed errors with their status (see ``errors``). A client that disconnects aborts
its requests, streamed or not, and frees their KV.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollout.engine.messages import GetInfo
from rollout.errors import (
    EngineDeadError,
    FailedPreconditionError,
    NotFoundError,
    RolloutError,
    UnauthenticatedError,
    quoted,
)
from rollout.server.http import responses as resp
from rollout.server.http.errors import (
    CHAT_PARAM,
    HTTP_STATUS,
    OPENAI_PARAM,
    RequestTooLargeError,
    error_body,
    error_response,
)
from rollout.server.http.schemas import ChatCompletionRequest, CompletionRequest
from rollout.server.http.to_engine import EngineCall, chat_call, completion_call
from rollout.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from rollout.engine.client import EngineClient
    from rollout.types import StreamChunk

logger = logging.getLogger(__name__)

METRICS_INFO_TIMEOUT_S = 5.0  # a scrape reports the engine not ready rather than wait on a stalled one


@dataclass
class HttpState:
    """What the routes share: the engine (None while it loads) and the server's settings."""

    model_name: str
    auth_token: str | None
    metrics: ServerMetrics
    stall_timeout_s: float = 10.0
    engine: EngineClient | None = None
    shutting_down: bool = False
    warned_fields: set[str] = field(default_factory=set)  # unknown request fields already logged

    def ready_engine(self) -> EngineClient:
        """The engine, if it can take requests now; UNAVAILABLE otherwise."""
        if self.engine is None:
            raise EngineDeadError("the engine is still loading; retry when /health answers 200")
        if self.shutting_down:
            raise EngineDeadError("the server is shutting down")
        if not self.engine.alive:
            raise EngineDeadError("the engine process died")
        if self.engine.tokenizer is None:
            raise FailedPreconditionError("the model has no tokenizer.json, which the OpenAI API needs; use gRPC")
        return self.engine


def _auth(state: HttpState) -> Callable[[Request], None]:
    expected = f"Bearer {state.auth_token}".encode() if state.auth_token else None

    def check(request: Request) -> None:
        if expected is None:
            return
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, expected):
            why = "missing auth token" if not sent else "invalid auth token"
            raise UnauthenticatedError(f"{why}: send the header 'Authorization: Bearer <token>'")

    return check


class _BodyLimit:
    """ASGI middleware refusing bodies over ``limit`` bytes: by Content-Length before reading, and
    while reading one sent without it (chunked)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _error(self, size: str) -> RequestTooLargeError:
        return RequestTooLargeError(f"the request body has {size} bytes; this server takes at most {self.limit} "
                                    "(--max-request-mb)")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await error_response(self._error(length.decode()))(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error(f"more than {self.limit}")
            return message

        await self.app(scope, counted, send)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``work`` until it ends or the client disconnects, whichever is first; returns (finished,
    result). Work cut short is cancelled, which aborts its engine requests."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()  # raises the engine's error


async def _merged(engine: EngineClient, call: EngineCall) -> AsyncIterator[tuple[int, StreamChunk]]:
    """The chunks of every prompt of ``call`` as they come, with the prompt's position; closing this
    early aborts every request left."""
    if len(call.adds) == 1:
        async for chunk in engine.astream(call.adds[0]):
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for chunk in engine.astream(call.adds[i]):
                queue.put_nowait((i, chunk, None))
            queue.put_nowait((i, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(call.adds))]
    left = len(tasks)
    try:
        while left:
            i, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                left -= 1
                continue
            yield i, chunk
    finally:
        for t in tasks:
            t.cancel()  # a cancelled stream aborts its request
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(event: dict[str, Any] | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n"


class _Generation:
    """One completion or chat request from its engine call to its response."""

    def __init__(self, state: HttpState, engine: EngineClient, call: EngineCall, *, chat: bool, logprobs: bool,
                 stream: bool, include_usage: bool) -> None:
        self.state, self.engine, self.call = state, engine, call
        self.chat, self.logprobs, self.stream, self.include_usage = chat, logprobs, stream, include_usage
        self.choices = [resp.Choice(i, engine.tokenizer, call.stops) for i in range(len(call.adds) * call.n)]
        self.events = _merged(engine, call)
        self._started: set[int] = set()  # choices whose first stream event went out

    def _choice(self, prompt: int, chunk: StreamChunk) -> resp.Choice:
        return self.choices[prompt * self.call.n + chunk.index]

    async def respond(self, request: Request) -> Response:
        if self.stream:
            # The first chunk is awaited here, so a request the engine refuses gets its HTTP status.
            finished, first = await _unless_disconnected(request, self.events.__anext__())
            if not finished:
                await self.events.aclose()
                return Response(status_code=499)  # nobody reads it: the client left
            return StreamingResponse(self._stream(first), media_type="text/event-stream")
        finished, _ = await _unless_disconnected(request, self._consume())
        if not finished:
            return Response(status_code=499)
        tok, model = self.engine.tokenizer, self.state.model_name
        body = (resp.chat_body if self.chat else resp.completion_body)(self.call, model, tok, self.choices,
                                                                       self.logprobs)
        return JSONResponse(body)

    async def _consume(self) -> None:
        async for prompt, chunk in self.events:
            self._choice(prompt, chunk).add(chunk)

    def _event(self, prompt: int, chunk: StreamChunk) -> dict[str, Any]:
        choice = self._choice(prompt, chunk)
        first = choice.index not in self._started
        self._started.add(choice.index)
        delta = choice.add(chunk)
        return resp.stream_event(self.call, self.state.model_name, self.engine.tokenizer, choice, chunk, delta,
                                 self.chat, self.logprobs, first)

    async def _stream(self, first: tuple[int, StreamChunk]) -> AsyncIterator[str]:
        try:
            yield _sse(self._event(*first))
            async for prompt, chunk in self.events:
                yield _sse(self._event(prompt, chunk))
            if self.include_usage:
                yield _sse(resp.usage_event(self.call, self.state.model_name, self.choices, self.chat))
        except RolloutError as e:  # the status line is sent already: the error goes in the stream
            yield _sse(error_body(str(e.code), e.message))
        finally:
            await self.events.aclose()
        yield _sse("[DONE]")


def build_app(state: HttpState, max_request_bytes: int) -> FastAPI:
    """The application serving ``state``'s engine."""
    app = FastAPI(title="rollout", docs_url=None, redoc_url=None, openapi_url=None)
    auth = Depends(_auth(state))
    app.add_middleware(_BodyLimit, limit=max_request_bytes)

    @app.exception_handler(RolloutError)
    async def rollout_error(request: Request, err: RolloutError) -> JSONResponse:
        response = error_response(err, CHAT_PARAM if request.url.path.endswith("/chat/completions") else OPENAI_PARAM)
        if isinstance(err, UnauthenticatedError):
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        # A body that is not JSON has a character offset for a location: no field to name.
        loc = [] if first.get("type") == "json_invalid" else [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", err))
        return JSONResponse(error_body("INVALID_ARGUMENT", message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if isinstance(err.__cause__, RolloutError):  # raised while FastAPI read the body (too large)
            return error_response(err.__cause__)
        code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(err.status_code, "INVALID_ARGUMENT")
        return JSONResponse(error_body(code, f"{request.method} {request.url.path}: {err.detail}",
                                       status=err.status_code), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        return error_response(err)

    def check_model(name: str) -> None:
        engine = state.engine
        if name != state.model_name and (engine is None or name != engine.info.model_path):
            raise NotFoundError(f"the model {quoted(name)} is not served here; this server serves "
                                f"{quoted(state.model_name)} (GET /v1/models)", field="model")

    @app.get("/health")
    async def health() -> Response:
        engine = state.engine
        if engine is None or state.shutting_down or not engine.alive:
            why = "loading" if engine is None else "shutting down" if state.shutting_down else "engine died"
            return JSONResponse(error_body("UNAVAILABLE", f"not serving: {why}"), status_code=503)
        if engine.stalled_for() >= state.stall_timeout_s:
            return JSONResponse(error_body("UNAVAILABLE", f"the engine has not answered for "
                                           f"{engine.stalled_for():.1f} s"), status_code=HTTP_STATUS["UNAVAILABLE"])
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> JSONResponse:
        engine = state.ready_engine()
        card = {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "rollout",
                "root": engine.info.model_path, "max_model_len": engine.limits.context_length}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics", dependencies=[auth])
    async def metrics() -> Response:
        info = None
        if state.engine is not None and state.engine.alive and not state.shutting_down:
            try:
                info = await asyncio.wait_for(state.engine.acall(GetInfo()), METRICS_INFO_TIMEOUT_S)
            except (asyncio.TimeoutError, RolloutError):
                info = None
        state.metrics.set_info(info)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        engine = state.ready_engine()
        call = completion_call(body, engine, state.warned_fields)
        include = bool(body.stream_options and body.stream_options.include_usage)
        return await _Generation(state, engine, call, chat=False, logprobs=body.logprobs is not None,
                                 stream=body.stream, include_usage=include).respond(request)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        engine = state.ready_engine()
        call = chat_call(body, engine, state.warned_fields)
        include = bool(body.stream_options and body.stream_options.include_usage)
        return await _Generation(state, engine, call, chat=True, logprobs=body.logprobs, stream=body.stream,
                                 include_usage=include).respond(request)

    return app
