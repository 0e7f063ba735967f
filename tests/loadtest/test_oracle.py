"""The oracle router's rule, against made-up probes, and against simulated replicas."""

from __future__ import annotations

import aiohttp

from loadtest.client import request_body
from loadtest.oracle import OracleRouter, Probe, choose
from loadtest.workloads import Session
from vllm_sim import run_replicas


def test_within_the_slo_the_longest_cache_hit_wins() -> None:
    probes = [Probe(0, 50.0), Probe(4096, 400.0), Probe(8192, 900.0), Probe(4096, 300.0)]
    assert choose(probes, 500.0) == 3  # 8192 cached but too slow; 4096 twice: the faster one


def test_a_prefix_cached_nowhere_goes_home_while_home_meets_the_slo() -> None:
    probes = [Probe(0, 50.0), Probe(0, 300.0), Probe(0, 900.0)]
    assert choose(probes, 500.0, home=1) == 1  # not the shortest queue: the same place every time
    assert choose(probes, 500.0, home=2) == 0  # home too slow: the lowest estimate within the SLO
    assert choose([Probe(16, 400.0), Probe(0, 50.0)], 500.0, home=1) == 0  # a hit beats home


def test_when_no_replica_meets_the_slo_the_lowest_estimate_wins() -> None:
    probes = [Probe(8192, 2000.0), Probe(0, 700.0), Probe(4096, 700.0)]
    assert choose(probes, 500.0) == 2  # equal estimates: the longer hit
    assert choose(probes, None) == 2  # no SLO: the lowest estimate


async def test_the_oracle_sends_a_prefix_to_the_replica_that_holds_it() -> None:
    system = [{"role": "system", "content": "a system prompt shared by a group of users " * 30}]
    async with run_replicas(3, speed=50.0) as replicas, aiohttp.ClientSession() as http:
        urls = [f"http://{r.address}" for r in replicas]
        model = replicas[0].config.model_name
        first = request_body(model, Session(("question one",), (2,)), 0, system)
        async with http.post(urls[2] + "/v1/chat/completions", json=first | {"stream": False}) as r:
            assert r.status == 200  # the prefix is now cached on replica 2 only
        second = request_body(model, Session(("another question",), (2,)), 0, system)
        assert await OracleRouter(http, urls, slo_ttft_ms=1000.0).pick(second) == urls[2]
        assert await OracleRouter(http, urls, slo_ttft_ms=None).pick(second) == urls[2]  # less to prefill
