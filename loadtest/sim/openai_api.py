"""OpenAI-compatible request parsing and response bodies, shaped like vLLM's.

The prompt is extracted by `picker.request.apply_body`, the same code the picker routes with, so
both sides agree on what the prompt text (and hence its token count and block hashes) is.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from picker.errors import Refusal
from picker.request import InferenceRequest, apply_body

# Chat templates end the prompt with the assistant's turn marker; picker.request renders each
# message as "role\ncontent\n", so this is the marker in that rendering.
GENERATION_PROMPT = "assistant\n"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions


@dataclass(frozen=True, slots=True)
class GenerationParams:
    model: str
    prompt: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: not given by the client
    min_tokens: int | None  # given: the output length is drawn from [min_tokens, max_tokens]
    seed: int | None


def parse_generation(body: bytes, chat: bool) -> GenerationParams:
    """Read a /v1/chat/completions (`chat`) or /v1/completions body; raises Refusal."""
    request = InferenceRequest(method="POST", content_type="application/json")
    apply_body(request, body, max_prefix_chars=sys.maxsize)
    doc: dict[str, Any] = orjson.loads(body)  # apply_body proved it is a JSON object
    required = "messages" if chat else "prompt"
    if required not in doc:
        raise Refusal(400, f"'{required}' is required")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = next((doc[n] for n in names if doc.get(n) is not None), None)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise Refusal(400, "'max_tokens' must be an integer of at least 1")
    min_tokens = doc.get("min_tokens")
    if min_tokens is not None and (not _is_int(min_tokens) or min_tokens < 0):
        raise Refusal(400, "'min_tokens' must be a non-negative integer")
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise Refusal(400, "'min_tokens' must be less than or equal to 'max_tokens'")
    if doc.get("n", 1) != 1:
        raise Refusal(400, "the simulator supports only n=1")
    seed = doc.get("seed")
    if seed is not None and not _is_int(seed):
        raise Refusal(400, "'seed' must be an integer")
    options = doc.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return GenerationParams(
        model=request.model,
        prompt=request.prompt + GENERATION_PROMPT if chat else request.prompt,
        stream=request.stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        seed=seed,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseWriter:
    """Bodies and SSE chunks of one completion, chat or text flavoured."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, text: str, finish_reason: str | None, streaming: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text
        elif streaming:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
        choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=None)
        return choice

    def body(self, text: str, finish_reason: str, usage: dict[str, Any]) -> bytes:
        """The non-streaming response."""
        kind = "chat.completion" if self.chat else "text_completion"
        doc = self._envelope(kind, [self._choice(text, finish_reason, streaming=False)])
        doc["usage"] = usage
        return orjson.dumps(doc)

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return b"data: " + orjson.dumps(self._envelope(kind, choices) | extra) + b"\n\n"

    def role_chunk(self) -> bytes:
        """A chat stream's first event: the assistant role with empty content."""
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])  # fmt: skip

    def chunk(self, text: str, finish_reason: str | None) -> bytes:
        return self._event([self._choice(text, finish_reason, streaming=True)])

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        return self._event([], usage=usage)

    DONE = b"data: [DONE]\n\n"
