"""OpenAI-style error bodies, shared by the picker's immediate responses and the simulator."""

from __future__ import annotations

from http import HTTPStatus

import orjson

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


def openai_error_body(status: int, message: str, code: str | None = None) -> bytes:
    """The JSON body OpenAI clients parse into an APIError (`error.message`, `type`, `code`)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": kind,
                "param": None,
                "code": code or HTTPStatus(status).phrase.lower().replace(" ", "_"),
            }
        }
    )
