"""Real tokens, seen from outside: /tokenize and /detokenize, usage counts and the chat template,
checked against the tokenizer file read independently (`tests/support/tokens.py`)."""

from __future__ import annotations

import random

import httpx
import openai
import pytest

from loadtest.text import sized_text
from tests.sim.conftest import MODEL, scrape, value
from tests.support.tokens import TOKENIZER, count_tokens, llama3_chat

CHAT = [{"role": "system", "content": "you are brief"}, {"role": "user", "content": "the state of the world"}]


async def test_tokenize_round_trip_matches_the_tokenizer(http: httpx.AsyncClient) -> None:
    prompt = sized_text(random.Random(1), 300)
    answer = (
        await http.post("/tokenize", json={"model": MODEL, "prompt": prompt, "return_token_strs": True})
    ).json()
    expected = TOKENIZER.encode(prompt)
    assert answer["tokens"] == expected.ids and answer["count"] == 301  # BOS added, as vLLM does
    assert answer["token_strs"] == expected.tokens and answer["max_model_len"] == 4096
    back = (await http.post("/detokenize", json={"model": MODEL, "tokens": answer["tokens"]})).json()
    assert back == {"prompt": prompt}
    bare = (await http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False})).json()
    assert bare["tokens"] == answer["tokens"][1:]


async def test_chat_is_rendered_through_the_template_before_tokenizing(http: httpx.AsyncClient) -> None:
    expected = TOKENIZER.encode(
        llama3_chat(*((m["role"], m["content"]) for m in CHAT)), add_special_tokens=False
    )
    tokenized = (await http.post("/tokenize", json={"messages": CHAT})).json()
    assert tokenized["tokens"] == expected.ids
    answer = (await http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3})).json()
    assert answer["usage"]["prompt_tokens"] == len(expected.ids)
    no_prompt = (await http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})).json()
    assert no_prompt["count"] == len(expected.ids) - count_tokens(
        "<|start_header_id|>assistant<|end_header_id|>\n\n", special=False
    )


@pytest.mark.parametrize("common", [True, False])
async def test_prompt_tokens_are_the_tokenizers_count_not_a_character_ratio(
    http: httpx.AsyncClient, common: bool
) -> None:
    prompt = sized_text(random.Random(2), 500, common=common)
    usage = (await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens"] == count_tokens(prompt) == 501
    assert usage["prompt_tokens"] != -(-len(prompt) // 4)


async def test_token_id_prompts_are_taken_as_they_are(http: httpx.AsyncClient) -> None:
    ids = TOKENIZER.encode(sized_text(random.Random(3), 40)).ids
    usage = (await http.post("/v1/completions", json={"prompt": ids, "max_tokens": 2})).json()["usage"]
    assert usage["prompt_tokens"] == len(ids)
    again = (await http.post("/v1/completions", json={"prompt": [ids], "max_tokens": 2})).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == 32  # same ids, same blocks


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/completions", {"prompt": [10**9]}, "out of vocabulary"),
        ("/tokenize", {"model": MODEL}, "'prompt' or 'messages' is required"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "must be a boolean"),
        ("/detokenize", {"tokens": ["a"]}, "array of token ids"),
        ("/detokenize", {"tokens": [10**9]}, "out of vocabulary"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "text",
        ),
    ],
)
async def test_bad_token_requests_get_openai_errors(
    http: httpx.AsyncClient, path: str, body: dict[str, object], fragment: str
) -> None:
    response = await http.post(path, json=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


async def test_generated_text_tokenizes_to_the_reported_count(
    replica: object, http: httpx.AsyncClient
) -> None:
    base_url = str(http.base_url).rstrip("/") + "/v1"
    async with openai.AsyncOpenAI(api_key="unused", base_url=base_url, max_retries=0) as sdk:
        result = await sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=25, seed=4)  # type: ignore[arg-type]
    text = result.choices[0].message.content or ""
    assert result.usage is not None and result.usage.completion_tokens == 25
    assert count_tokens(text, special=False) == 25


async def test_ignore_eos_runs_to_the_limit(http: httpx.AsyncClient) -> None:
    body = {"messages": CHAT, "max_tokens": 40, "min_tokens": 1, "seed": 3}
    stopped = (await http.post("/v1/chat/completions", json=body)).json()
    ignored = (await http.post("/v1/chat/completions", json=body | {"ignore_eos": True})).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] < 40
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 40


async def test_metrics_count_real_tokens(http: httpx.AsyncClient) -> None:
    prompt = sized_text(random.Random(5), 700)
    for _ in range(2):
        await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3})
    samples = await scrape(http)
    cached = 701 // 16 * 16
    assert value(samples, "vllm:prompt_tokens_total") == 2 * 701
    assert value(samples, "vllm:prompt_tokens_cached_total") == cached
    assert value(samples, "vllm:prompt_tokens_by_source_total", source="local_cache_hit") == cached
    assert value(samples, "vllm:prompt_tokens_by_source_total", source="local_compute") == 2 * 701 - cached
    assert value(samples, "vllm:request_prompt_tokens_sum") == 2 * 701
    assert value(samples, "vllm:request_prefill_kv_computed_tokens_sum") == 2 * 701 - cached
    assert value(samples, "vllm:iteration_tokens_total_sum") == 2 * (701 + 3)


@pytest.mark.parametrize(
    "text",
    [
        "hello  world \n\n  the. state, 123 4567 x'll  é ü 日本  <|eot_id|> a<|eot_id|>b  ",
        " leading and trailing spaces ",
        "tabs\tand\nnewlines \n mixed  ,  with ... punctuation!",
    ],
)
async def test_odd_text_tokenizes_exactly_as_the_tokenizer_does(http: httpx.AsyncClient, text: str) -> None:
    """The replica remembers the pieces of text it has seen (split before spaces); whatever the
    spacing, its tokens are the tokenizer's, twice in a row."""
    for _ in range(2):
        answer = (await http.post("/tokenize", json={"prompt": text})).json()
        assert answer["tokens"] == TOKENIZER.encode(text).ids
