"""The /metrics page: vLLM V1's families, help texts and buckets, rendered as prometheus_client
would render them."""

from __future__ import annotations

import httpx
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from vllm_sim import exposition

# Every family a vLLM V1 server (v0.11+, one engine, no speculative decoding or KV connector)
# exports, by the type prometheus_client's parser reports.
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:engine_sleep_state": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:lora_requests_info": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:external_prefix_cache_queries": "counter",
    "vllm:external_prefix_cache_hits": "counter",
    "vllm:mm_cache_queries": "counter",
    "vllm:mm_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:prompt_tokens_by_source": "counter",
    "vllm:prompt_tokens_cached": "counter",
    "vllm:prompt_tokens_recomputed": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:iteration_tokens_total": "histogram",
    "vllm:request_max_num_generation_tokens": "histogram",
    "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:time_per_prefill_token_request_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prefill_kv_computed_tokens": "histogram",
    "http_requests": "counter",
    "http_request_size_bytes": "summary",
    "http_response_size_bytes": "summary",
    "http_request_duration_highr_seconds": "histogram",
    "http_request_duration_seconds": "histogram",
    "process_cpu_seconds": "counter",
    "python_gc_collections": "counter",
}
TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
        40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip


def buckets(family: prometheus_client.Metric) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]


async def test_the_page_has_every_vllm_family_with_its_buckets(http: httpx.AsyncClient) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=chat) as response:
        async for _ in response.aiter_lines():
            pass
    page = (await http.get("/metrics")).text
    families = {family.name: family for family in text_string_to_metric_families(page)}
    assert {name: families[name].type for name in VLLM_FAMILIES if name in families} == VLLM_FAMILIES
    assert buckets(families["vllm:time_to_first_token_seconds"]) == [*TTFT, float("inf")]
    # The FAST profile's max_model_len is 4096: 1, 2, 5, ... 2000, then +Inf.
    lengths = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, float("inf")]
    assert buckets(families["vllm:request_prompt_tokens"]) == lengths
    assert len(page) > 30_000  # a real vLLM page's size: mostly histogram buckets
    ttft = {s.name: s.value for s in families["vllm:time_to_first_token_seconds"].samples}
    assert ttft["vllm:time_to_first_token_seconds_count"] == 1
    handlers = {s.labels["handler"] for s in families["http_requests"].samples}
    assert handlers == {"/v1/chat/completions"}  # /metrics itself is not instrumented, as in vLLM


def test_exposition_renders_what_prometheus_client_renders() -> None:
    registry = prometheus_client.CollectorRegistry()
    theirs_h = prometheus_client.Histogram("h_seconds", "A histogram.", ["model_name", "engine"],
                                           buckets=(0.1, 1.0, 1e6), registry=registry)  # fmt: skip
    theirs_c = prometheus_client.Counter("c", 'Help with "quotes".', ["reason"], registry=registry)
    theirs_s = prometheus_client.Summary("s_bytes", "A summary.", ["handler"], registry=registry)
    theirs_g = prometheus_client.Gauge("g", "A gauge.", registry=registry)
    ours_h = exposition.Histogram("h_seconds", "A histogram.", ["model_name", "engine"], (0.1, 1.0, 1e6))
    ours_c = exposition.Counter("c", 'Help with "quotes".', ["reason"])
    ours_s = exposition.Summary("s_bytes", "A summary.", ["handler"])
    ours_g = exposition.Gauge("g", "A gauge.")
    for value in (0.05, 0.1, 0.7, 3.0, 2e6):
        theirs_h.labels('m "x"', "0").observe(value)
        ours_h.labels('m "x"', "0").observe(value)
        theirs_s.labels("/v1").observe(value)
        ours_s.labels("/v1").observe(value)
    theirs_c.labels("stop").inc(3)
    ours_c.labels("stop").inc(3)
    theirs_g.set(0.25)
    ours_g.labels().inc(0.25)
    expected = prometheus_client.generate_latest(registry).decode()
    expected = "".join(line + "\n" for line in expected.splitlines() if "_created" not in line)
    out: list[str] = []
    for family in (ours_h, ours_c, ours_s, ours_g):
        family.render(out)
    assert "".join(out) == expected
