"""The picker server with Kubernetes discovery: readiness waits for the pool to be synced."""

from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_asyncio.client import Configuration

from picker.discovery.kubernetes import kubernetes_source
from picker.server import PickerServer, ServeOptions

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _closed_port() -> int:
    """A port nothing listens on: the endpoint's scrapes fail at once (refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_not_serving_until_the_pool_is_synced(kube):
    source = kubernetes_source(
        pool_name="pool",
        namespace="default",
        selector=None,
        target_ports=None,
        configuration=Configuration(host=kube.url),
    )
    server = PickerServer(
        ServeOptions(source=source, grpc_port=0, grpc_health_port=0, metrics_port=0, secure_serving=False)
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            updates = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"))
            async with asyncio.timeout(10):
                assert (await updates.read()).status == NOT_SERVING
                await kube.wait_for_watches("inferencepools", 1)  # looked, found no pool
                kube.put_pod("a", "127.0.0.1")
                kube.put_pool(ports=(_closed_port(),))
                assert (await updates.read()).status == SERVING
            updates.cancel()
            assert len(server.pool) == 1
    finally:
        await server.stop(grace=0)
