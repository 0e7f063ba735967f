"""The picker process: readiness, graceful shutdown, and what its metrics port shows."""

from __future__ import annotations

import asyncio
import signal

import grpc
import httpx
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loadtest.processes import poll_until
from tests.protocol.conftest import body_message, destination, headers_message, remaining_answers


async def readiness(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=2.0
        )
        return answer.status


async def test_sigterm_turns_readiness_off_and_lets_open_streams_finish(fake_vllm, picker_server) -> None:
    replicas = await fake_vllm(2)
    picker = await picker_server([r.address for r in replicas], "--grace-period=10")
    assert await readiness(picker.health_port) == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(picker.address) as channel:
        call = ExternalProcessorStub(channel).Process()
        await call.write(headers_message())
        await call.read()
        await call.write(body_message(b'{"prompt": "in flight during shutdown"}'))
        pick, _ = destination(await call.read())
        assert pick in {r.address for r in replicas}
        picker.process.send_signal(signal.SIGTERM)

        # The open exchange keeps the process alive, draining, while it says it is not ready.
        async def not_ready() -> bool | None:
            status = await readiness(picker.health_port)
            return True if status == health_pb2.HealthCheckResponse.NOT_SERVING else None

        await poll_until(not_ready, within=10, what="readiness NOT_SERVING")
        assert picker.process.returncode is None
        await call.done_writing()  # the HTTP exchange ends: the stream closes cleanly (status OK)
        assert await remaining_answers(call) == []
    async with asyncio.timeout(10):
        assert await picker.process.wait() == 0


def samples(page: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


async def test_metrics_port_reports_decisions_inflight_and_refusals(fake_vllm, picker_server) -> None:
    replicas = await fake_vllm(2)
    replicas[1].metrics.waiting = 20  # every decision goes to replica 0
    picker = await picker_server([r.address for r in replicas])
    async with grpc.aio.insecure_channel(picker.address) as channel:
        stub = ExternalProcessorStub(channel)
        held = stub.Process()
        await held.write(headers_message())
        await held.read()
        await held.write(body_message(b'{"prompt": "secret prompt text"}'))
        await held.read()
        refused = stub.Process()
        await refused.write(headers_message())
        await refused.read()
        await refused.write(body_message(b"{broken"))
        assert (await refused.read()).immediate_response.status.code == 400
        async with httpx.AsyncClient() as http:
            page = (await http.get(f"http://127.0.0.1:{picker.metrics_port}/metrics")).text
        await held.done_writing()
    found = samples(page)
    assert "secret prompt text" not in page
    decisions = {labels["endpoint"]: v for labels, v in found["picker_decisions_total"]}
    assert decisions == {replicas[0].address: 1.0}
    inflight = {labels["endpoint"]: v for labels, v in found["picker_inflight_requests"]}
    assert inflight[replicas[0].address] == 1.0
    assert ({"status": "400"}, 1.0) in found["picker_immediate_responses_total"]
    assert found["picker_pick_duration_seconds_count"][0][1] == 1.0
    assert found["picker_extproc_streams_open"][0][1] >= 1.0
    routable = {labels["endpoint"]: v for labels, v in found["picker_endpoint_routable"]}
    assert routable == {r.address: 1.0 for r in replicas}
