"""parse_metrics against pages shaped like real vLLM v1 and SGLang `/metrics` output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from picker.datalayer.metrics import MetricsError, parse_labels, parse_metrics

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _buckets_1_2_5(max_value: int) -> list[float]:
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * 10**exponent > max_value:
                return out
            out.append(float(mantissa * 10**exponent))
        exponent += 1


_LATENCY = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]
_PER_TOKEN = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
# vLLM v1's histograms (vllm/v1/metrics/loggers.py), max_model_len 131072.
_HISTOGRAMS = {
    "vllm:request_prompt_tokens": _buckets_1_2_5(131072),
    "vllm:request_generation_tokens": _buckets_1_2_5(131072),
    "vllm:iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
    "vllm:request_max_num_generation_tokens": _buckets_1_2_5(131072),
    "vllm:request_params_n": [1, 2, 5, 10, 20],
    "vllm:request_params_max_tokens": _buckets_1_2_5(131072),
    "vllm:time_to_first_token_seconds": [
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1,
        2.5,
        5,
        7.5,
        10,
        20,
        40,
        80,
        160,
        640,
        2560,
    ],
    "vllm:time_per_output_token_seconds": _PER_TOKEN,
    "vllm:inter_token_latency_seconds": _PER_TOKEN,
    "vllm:e2e_request_latency_seconds": _LATENCY,
    "vllm:request_queue_time_seconds": _LATENCY,
    "vllm:request_inference_time_seconds": _LATENCY,
    "vllm:request_prefill_time_seconds": _LATENCY,
    "vllm:request_decode_time_seconds": _LATENCY,
}


def vllm_page(
    waiting: tuple[float, ...] = (3, 4),
    running: tuple[float, ...] = (10, 12),
    kv: tuple[float, ...] = (0.25, 0.75),
    kv_name: str = "vllm:kv_cache_usage_perc",
    lora: bool = True,
) -> bytes:
    """What vLLM v1 serves with one engine per entry of `waiting` (data parallel), rendered by
    prometheus_client exactly as vLLM does, process/platform collectors included."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    engines = [str(i) for i in range(len(waiting))]
    per_engine = ["model_name", "engine"]
    gauges = {
        "vllm:num_requests_running": running,
        "vllm:num_requests_waiting": waiting,
        kv_name: kv,
    }
    for name, values in gauges.items():
        gauge = Gauge(name, f"{name} help", per_engine, registry=registry)
        for engine, value in zip(engines, values, strict=True):
            gauge.labels(MODEL, engine).set(value)
    for name in (
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:num_preemptions",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
    ):
        counter = Counter(name, f"{name} help", per_engine, registry=registry)
        for engine in engines:
            counter.labels(MODEL, engine).inc(12345)
    success = Counter("vllm:request_success", "ok", [*per_engine, "finished_reason"], registry=registry)
    for engine in engines:
        for reason in ("stop", "length", "abort"):
            success.labels(MODEL, engine, reason).inc(7)
    for name, buckets in _HISTOGRAMS.items():
        histogram = Histogram(name, f"{name} help", per_engine, buckets=buckets, registry=registry)
        for engine in engines:
            for sample in (0.02, 3.0, 700.0):
                histogram.labels(MODEL, engine).observe(sample)
    info = {
        "block_size": "16",
        "cache_dtype": "auto",
        "calculate_kv_scales": "False",
        "cpu_offload_gb": "0",
        "enable_prefix_caching": "True",
        "gpu_memory_utilization": "0.9",
        "is_attention_free": "False",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": "26112",
        "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "builtin",
        "sliding_window": "None",
        "swap_space": "4",
        "swap_space_bytes": "4294967296",
    }
    cache_info = Gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        [*info, "engine"],
        registry=registry,
    )
    for engine in engines:
        cache_info.labels(**info, engine=engine).set(1)
    if lora:
        lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=registry,
        )
        # Label sets of earlier iterations linger with older timestamps.
        lora_info.labels("4", "", "sql-lora").set(1_700_000_000.5)
        lora_info.labels("4", 'q"uote', "sql-lora,chat-lora").set(1_700_000_123.25)
        lora_info.labels("4", "old", "").set(1_699_999_999.0)
    return generate_latest(registry)


SGLANG_PAGE = b"""\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-7B-Instruct"} 17.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{model_name="Qwen/Qwen2.5-7B-Instruct"} 81234.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen2.5-7B-Instruct"} 0.42
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="Qwen/Qwen2.5-7B-Instruct"} 1421.7
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-7B-Instruct"} 6.0
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="Qwen/Qwen2.5-7B-Instruct"} 0.61
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="Qwen/Qwen2.5-7B-Instruct"} 9.0
sglang:time_to_first_token_seconds_sum{model_name="Qwen/Qwen2.5-7B-Instruct"} 2.5
sglang:time_to_first_token_seconds_count{model_name="Qwen/Qwen2.5-7B-Instruct"} 9.0
"""


def test_realistic_vllm_page_two_engines() -> None:
    page = vllm_page()
    assert len(page) > 40_000  # histograms dominate, as on a real server
    metrics = parse_metrics(page)
    assert metrics.waiting == 7  # summed over engines
    assert metrics.running == 22
    assert metrics.kv_usage == pytest.approx(0.5)  # mean over engines
    assert metrics.block_size == 16
    assert metrics.num_gpu_blocks == 2 * 26112  # both engines' KV capacity
    assert metrics.max_lora == 4
    # The most recently stamped lora sample is current; its escaped quote is unescaped.
    assert metrics.running_loras == {"sql-lora", "chat-lora"}
    assert metrics.waiting_loras == {'q"uote'}
    # Decode speed: the inter-token latency histogram's totals, summed over engines.
    assert metrics.itl_count == 2 * 3
    assert metrics.itl_sum == pytest.approx(2 * (0.02 + 3.0 + 700.0))
    # Calibration counters, summed over engines (and finish reasons).
    assert metrics.prompt_tokens == 2 * 12345
    assert metrics.requests_finished == 2 * 3 * 7
    # Requests past their prefill (the TTFT histogram's count), for the prefill queue.
    assert metrics.first_tokens == 2 * 3


def test_prompt_token_lookalikes_do_not_count() -> None:
    page = vllm_page(waiting=(0,), running=(0,), kv=(0.0,)) + (
        b'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"} 999\n'
        b'vllm:prompt_tokens_cached_total{engine="0"} 999\n'
    )
    assert parse_metrics(page).prompt_tokens == 12345


def test_pre_010_time_per_output_token_histogram_is_the_decode_speed_fallback() -> None:
    page = (
        b'vllm:num_requests_waiting{engine="0"} 0\n'
        b'vllm:time_per_output_token_seconds_sum{engine="0"} 1.5\n'
        b'vllm:time_per_output_token_seconds_count{engine="0"} 100\n'
        b'vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf"} 100\n'
    )
    metrics = parse_metrics(page)
    assert (metrics.itl_sum, metrics.itl_count) == (1.5, 100)


def test_single_engine_without_lora() -> None:
    metrics = parse_metrics(vllm_page(waiting=(2,), running=(1,), kv=(0.1,), lora=False))
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (2, 1, pytest.approx(0.1))
    assert metrics.num_gpu_blocks == 26112
    assert metrics.max_lora is None
    assert metrics.running_loras == frozenset()


def test_deprecated_gpu_cache_name_is_a_fallback() -> None:
    page = vllm_page(kv=(0.3, 0.5), kv_name="vllm:gpu_cache_usage_perc")
    assert parse_metrics(page).kv_usage == pytest.approx(0.4)


def test_current_kv_name_wins_over_deprecated_one() -> None:
    page = vllm_page(kv=(0.9, 0.9)) + b'vllm:gpu_cache_usage_perc{engine="0"} 0.1\n'
    assert parse_metrics(page).kv_usage == pytest.approx(0.9)


def test_sglang_page() -> None:
    metrics = parse_metrics(SGLANG_PAGE)
    assert (metrics.waiting, metrics.running) == (6, 17)
    assert metrics.kv_usage == pytest.approx(0.42)
    assert metrics.block_size is None
    assert metrics.prompt_tokens is None and metrics.requests_finished is None
    assert metrics.first_tokens == 9


def test_lookalike_names_timestamps_and_crlf() -> None:
    page = (
        b"vllm:num_requests_waiting_by_reason 99\r\n"  # a longer name: not ours
        b"  vllm:num_requests_waiting 98\r\n"  # not at line start: not a sample line
        b"vllm:num_requests_waiting 3 1700000000000\r\n"  # explicit timestamp
        b'vllm:kv_cache_usage_perc{engine="0",odd="a}b\\"c"} 1e-1\r\n'
    )
    metrics = parse_metrics(page)
    assert metrics.waiting == 3
    assert metrics.kv_usage == pytest.approx(0.1)


def test_kv_float_error_above_one_is_tolerated() -> None:
    assert parse_metrics(b"vllm:kv_cache_usage_perc 1.0000000001\n").kv_usage == 1.0


def test_queue_alone_is_enough() -> None:
    metrics = parse_metrics(b"vllm:num_requests_waiting 4\n")
    assert (metrics.waiting, metrics.kv_usage) == (4, 0.0)


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (b"", "no queue or KV"),
        (b"<html>502 Bad Gateway</html>", "no queue or KV"),
        (b'vllm:num_requests_running 3\nvllm:cache_config_info{block_size="16"} 1\n', "no queue or KV"),
        (b"vllm:num_requests_waiting NaN\n", "finite"),
        (b"vllm:num_requests_waiting +Inf\n", "finite"),
        (b"vllm:num_requests_waiting -1\n", "finite"),
        (b"vllm:num_requests_waiting 1\nvllm:num_requests_running -Inf\n", "finite"),
        (b"vllm:num_requests_waiting abc\n", "not a number"),
        (b"vllm:kv_cache_usage_perc 1.5\n", "fraction"),
        (b"vllm:kv_cache_usage_perc 57.0\nvllm:kv_cache_usage_perc 0.1\n", "fraction"),
        (b"sglang:token_usage -0.2\n", "finite"),
        (b'vllm:num_requests_waiting 1\nvllm:lora_requests_info{max_lora="1"} nan\n', "finite"),
    ],
)
def test_nonsense_is_rejected(page: bytes, message: str) -> None:
    with pytest.raises(MetricsError, match=message):
        parse_metrics(page)


def test_oversized_page_is_rejected() -> None:
    page = vllm_page()
    assert parse_metrics(page, max_bytes=len(page)).waiting == 7
    with pytest.raises(MetricsError, match="cap"):
        parse_metrics(page, max_bytes=len(page) - 1)


def test_unusable_cache_info_labels_are_absent_not_fatal() -> None:
    page = (
        b"vllm:num_requests_waiting 1\n"
        b'vllm:cache_config_info{block_size="sixteen",num_gpu_blocks="None"} 1.0\n'
    )
    metrics = parse_metrics(page)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (None, None)


def test_label_parser_handles_escapes() -> None:
    labels = parse_labels(b'a="x\\"y",b = "back\\\\slash" ,c="line\\nbreak",d="",e="}{,="')
    assert labels == {"a": 'x"y', "b": "back\\slash", "c": "line\nbreak", "d": "", "e": "}{,="}
    assert parse_labels(b'bad=unquoted,ok="1",="x"') == {"ok": "1"}


_WANTED_NAMES = [
    b"vllm:num_requests_waiting",
    b"vllm:num_requests_running",
    b"vllm:kv_cache_usage_perc",
    b"vllm:gpu_cache_usage_perc",
    b"vllm:cache_config_info",
    b"vllm:lora_requests_info",
    b"sglang:num_queue_reqs",
    b"sglang:num_running_reqs",
    b"sglang:token_usage",
]
# Lines that start with a wanted name and continue with arbitrary bytes reach the label and
# number handling, which uniformly random bytes almost never would.
_LINES = st.one_of(
    st.binary(max_size=80),
    st.tuples(st.sampled_from(_WANTED_NAMES), st.binary(max_size=60)).map(b"".join),
    st.tuples(
        st.sampled_from(_WANTED_NAMES),
        st.lists(
            st.tuples(
                st.sampled_from(["block_size", "num_gpu_blocks", "max_lora", "running_lora_adapters", "x"]),
                st.one_of(st.text(max_size=12), st.sampled_from(["16", "0", "a, b", 'q\\"x'])),
            ),
            max_size=3,
        ),
        st.sampled_from(["1", "0.5", "-1", "NaN", "1e400", "2.0 123", "", "0x1", "1_0", "\xff"]),
    ).map(
        lambda t: (
            t[0]
            + b"{"
            + ",".join(f'{k}="{v}"' for k, v in t[1]).encode("utf-8", "surrogatepass")
            + b"} "
            + t[2].encode("utf-8", "surrogatepass")
        )
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=8).map(b"\n".join))
def test_arbitrary_bytes_only_raise_metrics_error(page: bytes) -> None:
    try:
        metrics = parse_metrics(page)
    except MetricsError:
        return
    assert metrics.waiting >= 0 and metrics.running >= 0
    assert 0.0 <= metrics.kv_usage <= 1.0
