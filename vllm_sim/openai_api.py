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
class PromptParams:
    """What to tokenize: a completion prompt (text or token ids) or chat messages."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None  # role and content strings
    add_special_tokens: bool | None = None  # None: the endpoint's default
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@dataclass(frozen=True, slots=True)
class GenerationParams:
    model: str
    prompt: PromptParams
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: not given by the client
    min_tokens: int | None  # given: the output length is drawn from [min_tokens, max_tokens]
    seed: int | None
    ignore_eos: bool


@dataclass(frozen=True, slots=True)
class TokenizeParams:
    model: str
    prompt: PromptParams
    return_token_strs: bool


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def _model(doc: dict[str, Any]) -> str:
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    return model


def _flag(doc: dict[str, Any], name: str, default: bool) -> bool:
    value = doc.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean")
    return value


def _prompt(doc: dict[str, Any], chat: bool) -> PromptParams:
    special = doc.get("add_special_tokens")
    if special is not None and not isinstance(special, bool):
        raise BadRequest("'add_special_tokens' must be a boolean")
    if chat:
        return PromptParams(
            messages=chat_messages(doc["messages"]),
            add_special_tokens=special,
            add_generation_prompt=_flag(doc, "add_generation_prompt", True),
            continue_final_message=_flag(doc, "continue_final_message", False),
        )
    return PromptParams(prompt=completion_prompt(doc["prompt"]), add_special_tokens=special)


def parse_generation(body: bytes, chat: bool) -> GenerationParams:
    """Read a /v1/chat/completions (`chat`) or /v1/completions body; raises BadRequest."""
    doc = parse_json_object(body)
    model = _model(doc)
    required = "messages" if chat else "prompt"
    if required not in doc:
        raise BadRequest(f"'{required}' is required")
    prompt = _prompt(doc, chat)
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
        ignore_eos=_flag(doc, "ignore_eos", False),
    )


def parse_tokenize(body: bytes) -> TokenizeParams:
    """A /tokenize body: vLLM's completion form (`prompt`) or chat form (`messages`)."""
    doc = parse_json_object(body)
    if "messages" not in doc and "prompt" not in doc:
        raise BadRequest("'prompt' or 'messages' is required")
    return TokenizeParams(
        model=_model(doc),
        prompt=_prompt(doc, chat="messages" in doc),
        return_token_strs=_flag(doc, "return_token_strs", False),
    )


def parse_detokenize(body: bytes) -> tuple[str, list[int]]:
    """A /detokenize body: (model, token ids)."""
    doc = parse_json_object(body)
    tokens = doc.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens):
        raise BadRequest("'tokens' must be an array of token ids")
    return _model(doc), tokens


def chat_messages(messages: object) -> list[dict[str, str]]:
    """Messages with string roles and contents (text parts joined), ready for a chat template."""
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array")
    normalized = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest("each message needs a 'role' string")
        normalized.append({"role": role, "content": message_text(message.get("content"))})
    return normalized


def message_text(content: object) -> str:
    """A message's content: a string, or the text parts of an array joined by newlines (vLLM's
    "string" content format for text-only models)."""
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
        return "\n".join(texts)
    raise BadRequest("message 'content' must be a string or an array of parts")


def completion_prompt(prompt: object) -> str | list[int]:
    """`/v1/completions` prompt: a string or token ids, alone or as the only item of an array."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise BadRequest("the simulator supports one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return prompt
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
