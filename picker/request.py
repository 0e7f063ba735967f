"""What the scheduler needs to know about one inference request, read from headers and body.

Bodies are parsed once with orjson and never re-serialised: the picker forwards the client's bytes
unchanged. Only the text that forms the prompt's prefix is kept, capped at `max_prefix_chars`, so a
many-MB prompt costs no more hashing than a 16 KB one. Once that prefix is full, arrays (messages,
content parts, prompts, token ids) are not walked further: an 8 MiB body holds ~300k messages or
~1M token ids, whose walk blocked the event loop (every other pick) for 0.1-0.5 s on top of the
parse (measured). The body's size then stands in for the prompt's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from picker.errors import Refusal

# Characters a token-id prompt's id is rendered as (so its text hashes and counts like text), and
# the reference EPP's character-to-token conversion of legacy config parameters. Routing decisions
# use each endpoint's calibrated characters per token instead (picker.datalayer.calibration).
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class InferenceRequest:
    method: str = "GET"
    path: str = "/"
    content_type: str = ""
    objective: str | None = None
    priority: int = 0
    session_key: str | None = None
    # `ip:port` set from the gateway's `envoy.lb.subset_hint`; None means "no hint given".
    subset: frozenset[str] | None = None
    # The conformance suite's `test-epp-endpoint-selection` (read only with --conformance-hooks).
    endpoint_selection: str | None = None
    model: str = ""
    prompt: str = ""
    prompt_chars: int = 0
    stream: bool = False
    body_bytes: int = 0
    # The parsed body, for plugins that need the request as the engine reads it (the precise
    # prefix scorer renders the chat template over the messages); None for a non-JSON body.
    document: dict[str, Any] | None = None
    # Prompt tokens the chosen endpoint is expected to hold already (the prefix scorers' estimate,
    # set as they learn the pick): the rest joins that endpoint's prefill queue.
    cached_tokens: int = 0
    # Per-request scratch space for plugins (e.g. prefix hashes computed once per cycle).
    cycle: dict[str, Any] = field(default_factory=dict)

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


def is_json_content_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def apply_body(request: InferenceRequest, body: bytes, max_prefix_chars: int) -> None:
    """Fill model / prompt / stream from an OpenAI-style body.

    Raises a 400 Refusal only when the body claims to be JSON (or looks like a JSON object) and is
    not a well-formed OpenAI request; any other body routes on load alone.
    """
    request.body_bytes = len(body)
    if not body:
        return
    declared = is_json_content_type(request.content_type)
    if not declared and body[:1] not in (b"{", b"[") and body.lstrip()[:1] != b"{":
        return
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if declared:
            raise Refusal(400, f"request body is not valid JSON: {exc}") from None
        return
    if not isinstance(doc, dict):
        raise Refusal(400, "request body must be a JSON object")
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise Refusal(400, "'model' must be a string")
    request.model = model
    request.document = doc
    request.stream = doc.get("stream") is True
    parts = _PromptBuilder(max_prefix_chars)
    if "messages" in doc:
        _chat_messages(doc["messages"], parts)
    elif "prompt" in doc:
        _completion_prompt(doc["prompt"], parts)
    elif "input" in doc:
        instructions = doc.get("instructions")
        if isinstance(instructions, str):
            parts.add(instructions)
        _responses_input(doc["input"], parts)
    request.prompt, request.prompt_chars = parts.result()
    if parts.skipped:  # the rest went uncounted: count at least the body's bytes
        request.prompt_chars = max(request.prompt_chars, len(body))


class _PromptBuilder:
    """Joins prompt pieces, keeping at most `cap` characters but counting them all."""

    __slots__ = ("cap", "kept", "pieces", "skipped", "total")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.pieces: list[str] = []
        self.kept = 0
        self.total = 0
        self.skipped = False  # items were left unwalked, so `total` is short

    def add(self, text: str) -> None:
        self.total += len(text)
        room = self.cap - self.kept
        if room > 0:
            piece = text if len(text) <= room else text[:room]
            self.pieces.append(piece)
            self.kept += len(piece)

    def full(self) -> bool:
        """True once the prefix is complete: the caller skips the rest of its array."""
        if self.kept >= self.cap:
            self.skipped = True
        return self.skipped

    def result(self) -> tuple[str, int]:
        return "".join(self.pieces), self.total


def _chat_messages(messages: object, parts: _PromptBuilder) -> None:
    if not isinstance(messages, list):
        raise Refusal(400, "'messages' must be an array")
    for message in messages:
        if parts.full():
            return
        if not isinstance(message, dict):
            raise Refusal(400, "each message must be an object")
        _message(message, parts)


def _message(message: dict[str, object], parts: _PromptBuilder) -> None:
    """A chat message or a responses input item: its role, then its content."""
    role = message.get("role")
    parts.add(role if isinstance(role, str) else "")
    parts.add("\n")
    _content(message.get("content"), parts)
    parts.add("\n")


def _content(content: object, parts: _PromptBuilder) -> None:
    """A message's content: a string or an array of content parts (text parts contribute)."""
    if isinstance(content, str):
        parts.add(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.add(text)
            elif isinstance(part, str):
                parts.add(part)
    elif content is not None:
        raise Refusal(400, "message 'content' must be a string or an array of parts")


def _completion_prompt(prompt: object, parts: _PromptBuilder) -> None:
    """`/v1/completions` prompt: a string, token ids, or an array of strings / token-id arrays."""
    _text_or_tokens(prompt, parts, "prompt", items=False)


def _responses_input(value: object, parts: _PromptBuilder) -> None:
    """`/v1/responses` and `/v1/embeddings` input: as a prompt, or an array of input items."""
    _text_or_tokens(value, parts, "input", items=True)


def _text_or_tokens(value: object, parts: _PromptBuilder, field: str, *, items: bool) -> None:
    if isinstance(value, str):
        parts.add(value)
        return
    if not isinstance(value, list):
        raise Refusal(400, f"'{field}' must be a string or an array")
    if value and isinstance(value[0], int):
        _token_ids(value, parts)
        return
    for item in value:
        if parts.full():
            return
        if isinstance(item, str):
            parts.add(item)
        elif isinstance(item, list):
            _token_ids(item, parts)
        elif items and isinstance(item, dict):
            _message(item, parts)
        else:
            raise Refusal(
                400, f"'{field}' items must be strings or token ids" + (" or objects" if items else "")
            )


def _token_ids(ids: list[object], parts: _PromptBuilder) -> None:
    """Token-id prompts: each id stands for one token's worth of characters."""
    for token in ids:
        if parts.full():
            return
        if not isinstance(token, int):
            raise Refusal(400, "token-id prompts must contain only integers")
        parts.add(f"{token:>{CHARS_PER_TOKEN}}"[-CHARS_PER_TOKEN:])
