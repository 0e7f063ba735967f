"""OpenAI-compatible request parsing, response bodies and error bodies, shaped like vLLM's.

The simulator reads requests itself rather than with the picker's parser: the two must be able
to disagree about a prompt, as a real server and a router can.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

from vllm_sim.tokens import CHARS_PER_TOKEN

# Chat templates end the prompt with the assistant's turn marker; `render_chat` renders each
# message as "role\ncontent\n", so this is the marker in that rendering.
GENERATION_PROMPT = "assistant\n"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions


class BadRequest(ValueError):
    """A request no replica could serve; answered with an OpenAI error body and `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_body(status: int, message: str) -> bytes:
    """vLLM's error response: `{"error": {message, type, param, code}}`, type named for the status."""
    phrase = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    kind = phrase if phrase.endswith("Error") else phrase + "Error"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})


@dataclass(frozen=True, slots=True)
class GenerationParams:
    model: str
    prompt: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: not given by the client
    min_tokens: int | None  # given: the output length is drawn from [min_tokens, max_tokens]
    seed: int | None


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def parse_generation(body: bytes, chat: bool) -> GenerationParams:
    """Read a /v1/chat/completions (`chat`) or /v1/completions body; raises BadRequest."""
    doc = parse_json_object(body)
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    required = "messages" if chat else "prompt"
    if required not in doc:
        raise BadRequest(f"'{required}' is required")
    prompt = render_chat(doc["messages"]) if chat else completion_prompt(doc["prompt"])
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = next((doc[n] for n in names if doc.get(n) is not None), None)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise BadRequest("'max_tokens' must be an integer of at least 1")
    min_tokens = doc.get("min_tokens")
    if min_tokens is not None and (not _is_int(min_tokens) or min_tokens < 0):
        raise BadRequest("'min_tokens' must be a non-negative integer")
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise BadRequest("'min_tokens' must be less than or equal to 'max_tokens'")
    if doc.get("n", 1) != 1:
        raise BadRequest("the simulator supports only n=1")
    seed = doc.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest("'seed' must be an integer")
    options = doc.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return GenerationParams(
        model=model,
        prompt=prompt,
        stream=doc.get("stream") is True,
        include_usage=include_usage,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        seed=seed,
    )


def render_chat(messages: object) -> str:
    """The prompt a chat template makes of `messages`, ending with the assistant's turn marker."""
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array")
    pieces = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest("each message needs a 'role' string")
        pieces += [role, "\n", message_text(message.get("content")), "\n"]
    return "".join(pieces) + GENERATION_PROMPT


def message_text(content: object) -> str:
    """A message's content: a string, or the text of an array of content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise BadRequest("the simulator supports only text content parts")
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest("a text content part needs a 'text' string")
            texts.append(text)
        return "".join(texts)
    raise BadRequest("message 'content' must be a string or an array of parts")


def completion_prompt(prompt: object) -> str:
    """`/v1/completions` prompt: a string or token ids, alone or as the only item of an array."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise BadRequest("the simulator supports one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return "".join(f"{token:>{CHARS_PER_TOKEN}}"[-CHARS_PER_TOKEN:] for token in prompt)
    raise BadRequest("'prompt' must be a string, an array of token ids, or an array of one of them")


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
