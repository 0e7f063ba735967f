"""gRPC health in the EPP's three service names; readiness follows the picker's state."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

LIVENESS = "liveness"
READINESS = "readiness"
EXTPROC = "envoy.service.ext_proc.v3.ExternalProcessor"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health_aio.HealthServicer):
    """Live from the start; ready (and the ext_proc service serving) once endpoints are known."""

    def __init__(self) -> None:
        super().__init__()
        self._ready = False

    async def start(self) -> None:
        await self.set(LIVENESS, SERVING)
        await self.set("", SERVING)
        await self.set_ready(False)

    async def set_ready(self, ready: bool) -> None:
        self._ready = ready
        status = SERVING if ready else NOT_SERVING
        await self.set(READINESS, status)
        await self.set(EXTPROC, status)

    @property
    def ready(self) -> bool:
        return self._ready
