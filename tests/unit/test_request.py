"""Request understanding: what the scheduler learns from OpenAI-style bodies."""

import orjson
import pytest

from picker.errors import Refusal
from picker.request import CHARS_PER_TOKEN, InferenceRequest, apply_body


def parsed(doc: object, content_type: str = "application/json", cap: int = 16384) -> InferenceRequest:
    request = InferenceRequest(method="POST", content_type=content_type)
    apply_body(request, orjson.dumps(doc), cap)
    return request


def test_completion_prompt_string_gives_model_prompt_and_stream() -> None:
    request = parsed({"model": "m", "prompt": "hello world", "stream": True})
    assert (request.model, request.prompt, request.stream) == ("m", "hello world", True)
    assert request.prompt_chars == len("hello world")


def test_completion_prompt_list_of_strings_is_joined_in_order() -> None:
    assert parsed({"prompt": ["ab", "cd"]}).prompt == "abcd"


def test_token_id_prompts_count_one_token_width_per_id() -> None:
    request = parsed({"prompt": [1, 2, 3, 40000]})
    assert request.prompt_chars == 4 * CHARS_PER_TOKEN
    assert parsed({"prompt": [[1, 2], [3]]}).prompt_chars == 3 * CHARS_PER_TOKEN


def test_chat_messages_with_strings_and_content_parts() -> None:
    request = parsed(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
            ],
        }
    )
    assert request.prompt == "system\nbe brief\nuser\nhi\n"
    assert request.stream is False


def test_same_conversation_prefix_gives_same_prompt_prefix() -> None:
    history = [{"role": "user", "content": "x" * 500}, {"role": "assistant", "content": "y" * 300}]
    first = parsed({"messages": history})
    second = parsed({"messages": [*history, {"role": "user", "content": "next"}]})
    assert second.prompt.startswith(first.prompt)


def test_responses_input_with_instructions_and_items() -> None:
    request = parsed(
        {
            "model": "m",
            "instructions": "sys ",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}],
        }
    )
    assert request.prompt == "sys user\nq\n"


def test_embeddings_input_strings() -> None:
    assert parsed({"input": ["a", "b"]}).prompt == "ab"


def test_prefix_is_capped_but_length_counts_everything() -> None:
    request = parsed({"prompt": "z" * 10_000}, cap=64)
    assert request.prompt == "z" * 64
    assert request.prompt_chars == 10_000


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"model": "m", "prompt": "x"', b"\xff\xfe\x00", b'"just a string"', b"[1, 2]"],
)
def test_declared_json_that_does_not_parse_as_an_object_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(Refusal) as info:
        apply_body(InferenceRequest(content_type="application/json; charset=utf-8"), body, 100)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "doc",
    [
        {"model": 5, "prompt": "x"},
        {"messages": "hi"},
        {"messages": ["hi"]},
        {"messages": [{"role": "user", "content": 7}]},
        {"prompt": {"a": 1}},
        {"prompt": [1, "two"]},
        {"input": 3},
    ],
)
def test_wrongly_typed_fields_are_bad_requests(doc: object) -> None:
    with pytest.raises(Refusal):
        parsed(doc)


def test_non_json_body_routes_without_a_prompt() -> None:
    request = InferenceRequest(content_type="text/plain")
    apply_body(request, b"just some text", 100)
    assert (request.prompt, request.model, request.body_bytes) == ("", "", 14)


def test_undeclared_json_object_is_still_understood_but_broken_json_is_not_an_error() -> None:
    request = InferenceRequest(content_type="")
    apply_body(request, b'{"model": "m", "prompt": "p"}', 100)
    assert (request.model, request.prompt) == ("m", "p")
    broken = InferenceRequest(content_type="application/x-www-form-urlencoded")
    apply_body(broken, b'{"model": ', 100)
    assert broken.model == ""


def test_deeply_nested_json_is_a_bad_request_not_a_crash() -> None:
    with pytest.raises(Refusal):
        apply_body(InferenceRequest(content_type="application/json"), b"[" * 100_000, 100)
