"""The one way the picker says no: a `Refusal`, answered to the client as an OpenAI-style error."""

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


class Refusal(Exception):
    """A request the picker answers itself (an ext_proc ImmediateResponse) instead of routing.

    Raised or returned wherever the reason is found (parsing: 400, limits: 413, admission: 429,
    no candidate: 503); the protocol layer turns every one into the same kind of answer.
    """

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, for a Retry-After header


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
