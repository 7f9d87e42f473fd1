"""Errors of the HTTP front end as OpenAI error objects, keeping the gRPC status's meaning.

Body: ``{"error": {"message", "type", "param", "code"}}`` where ``code`` is the gRPC status name
(INVALID_ARGUMENT, OUT_OF_RANGE, ...) and the HTTP status is its standard mapping (the one
grpc-gateway and Google APIs use): 400 for bad input, 401 / 403 for auth, 404, 429 when the engine
cannot take more, 501, 503 while the engine loads or after it died, 500 otherwise.
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from rollout.errors import ResourceExhaustedError, RolloutError, clip_message

logger = logging.getLogger(__name__)

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# The "type" the OpenAI API gives each HTTP status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}
# Engine field names as the OpenAI API names them, so "param" points at what the caller sent.
OPENAI_PARAM = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "input_ids": "prompt",
                "text": "prompt", "top_logprobs_num": "logprobs"}
CHAT_PARAM = {**OPENAI_PARAM, "input_ids": "messages", "text": "messages", "top_logprobs_num": "top_logprobs"}


class RequestTooLargeError(ResourceExhaustedError):
    """A request body over the server's limit (HTTP 413)."""

    http_status = 413


def error_body(code: str, message: str, param: str | None = None, status: int | None = None) -> dict:
    """The OpenAI error object of a status ``code`` (a gRPC status name)."""
    status = status or HTTP_STATUS.get(code, 500)
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": clip_message(message), "type": kind, "param": param, "code": code}}


def error_response(err: Exception, param_names: dict[str, str] = OPENAI_PARAM) -> JSONResponse:
    """The JSON response of an error: a ``RolloutError`` keeps its status; anything else is INTERNAL.
    ``param_names`` maps engine field names to the endpoint's (``CHAT_PARAM`` for chats)."""
    if not isinstance(err, RolloutError):
        logger.error("request failed", exc_info=err)
        return JSONResponse(error_body("INTERNAL", f"{type(err).__name__}: {err}"), status_code=500)
    code = str(err.code)
    status = getattr(err, "http_status", None) or HTTP_STATUS.get(code, 500)
    param = param_names.get(err.field, err.field) if err.field else None
    message = f"{param}: {err.reason}" if param else err.message
    return JSONResponse(error_body(code, message, param, status), status_code=status)
