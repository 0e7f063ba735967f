"""Wires the picker together and runs it: ext_proc and health gRPC servers, metrics, discovery."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CollectorRegistry

from picker import debug, telemetry
from picker.admission import Admission
from picker.config import Config
from picker.datalayer.pool import EndpointPool
from picker.datalayer.scraper import Scraper
from picker.discovery.source import EndpointSource
from picker.protocol.extproc import ExtProcService
from picker.protocol.health import EXTPROC, Health
from picker.reference_metrics import ReferenceMetrics
from picker.requestcontrol import RequestControl
from picker.scheduling.scheduler import Scheduler
from picker.tls import server_credentials

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    source: EndpointSource
    config: Config = field(default_factory=Config)
    bind_address: str = "127.0.0.1"
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    secure_serving: bool = True
    cert_path: str | None = None
    grace_period: float = 25.0
    log_prompts: bool = False
    conformance_hooks: bool = False  # the GIE conformance suite's request/response headers
    pool_name: str = ""  # the InferencePool, for the reference metrics' `name` label


def _grpc_options(config: Config) -> list[tuple[str, int]]:
    """Limits sized for bursts of long prompts (see reference.md: defaults drop streams)."""
    message_limit = config.limits.max_body_bytes + 1024 * 1024
    return [
        ("grpc.max_receive_message_length", message_limit),
        ("grpc.max_send_message_length", message_limit),
        ("grpc.max_concurrent_streams", 1_000_000),
        ("grpc.server.max_pending_requests", 100_000),
        ("grpc.server.max_pending_requests_hard_limit", 200_000),
        ("grpc.so_reuseport", 0),  # a second picker on the same port must fail, not share it
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def extproc_handler(service: ExtProcService) -> grpc.GenericRpcHandler:
    """Raw-bytes handler: no (de)serializers, so answers go out as the cached bytes they are.

    `close` serves Process as stream-unary so its last answer can share a batch with the RPC's
    end (see picker.protocol.extproc); to the gateway either is a bidirectional stream.
    """
    if service.closing:
        handler = grpc.stream_unary_rpc_method_handler(service.process_closing)
    else:
        handler = grpc.stream_stream_rpc_method_handler(service.process_echoing)
    return grpc.method_handlers_generic_handler(EXTPROC, {"Process": handler})


class PickerServer:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        config = options.config
        self.pool = EndpointPool()
        self.scraper = Scraper(self.pool, config.metrics)
        self.scheduler = Scheduler.from_config(config, self.pool, conformance_hooks=options.conformance_hooks)
        self.control = RequestControl(
            self.pool,
            self.scheduler,
            Admission(config.saturation, config.metrics),
            config,
            log_prompts=options.log_prompts,
            probe=self.scraper.probe,
        )
        self.extproc = ExtProcService(self.control, config, conformance_hooks=options.conformance_hooks)
        self.health = Health()
        self._servers: list[grpc.aio.Server] = []
        self._services: list[asyncio.Task[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_http: WSGIServer | None = None
        self.grpc_port = options.grpc_port
        self.grpc_health_port = options.grpc_health_port
        self.metrics_port = options.metrics_port

    async def start(self) -> None:
        opts = self.options
        await self.health.start()
        main = grpc.aio.server(options=_grpc_options(opts.config))
        main.add_generic_rpc_handlers((extproc_handler(self.extproc),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        address = f"{opts.bind_address}:{opts.grpc_port}"
        if opts.secure_serving:
            self.grpc_port = main.add_secure_port(address, server_credentials(opts.cert_path))
        else:
            self.grpc_port = main.add_insecure_port(address)
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
        self.grpc_health_port = health_server.add_insecure_port(
            f"{opts.bind_address}:{opts.grpc_health_port}"
        )
        self._servers = [main, health_server]
        await health_server.start()  # ext_proc starts once ready: see _become_ready
        # picker's own metrics, the reference EPP's names beside them, and the debug views
        exported = CollectorRegistry(auto_describe=False)
        exported.register(telemetry.REGISTRY)
        stale_after = opts.config.metrics.stale_after
        exported.register(ReferenceMetrics(self.pool, self.scheduler, opts.pool_name, stale_after))
        wsgi = debug.app(exported, self.pool, self.scheduler, stale_after)
        self._metrics_http = debug.serve(opts.bind_address, opts.metrics_port, wsgi)
        self.metrics_port = self._metrics_http.server_port
        # Discovery and scraping run for the server's life; readiness ends once it is ready.
        self._services = [
            asyncio.create_task(opts.source.run(self.pool.set_addresses), name="discovery"),
            asyncio.create_task(self.scraper.run(), name="scraper"),
            *(
                asyncio.create_task(service.run(), name=type(service).__name__)
                for service in self.scheduler.services
            ),
        ]
        self._tasks = [*self._services, asyncio.create_task(self._become_ready(), name="readiness")]
        log.info(
            "picker: ext_proc on %s:%d (%s) once ready, health on %d, metrics on %d",
            opts.bind_address,
            self.grpc_port,
            "TLS" if opts.secure_serving else "plaintext",
            self.grpc_health_port,
            self.metrics_port,
        )

    async def _become_ready(self) -> None:
        """Serve ext_proc only once endpoints are known. Before that every pick would be a 503;
        unanswered, Envoy waits (at most the first scrape round, bounded by the scrape timeout)
        or fails open, which serves the requests instead of refusing them."""
        await self.pool.synced.wait()
        await self.scraper.first_round.wait()
        await self._servers[0].start()
        await self.health.set_ready(True)
        log.info("ready: %d endpoints known", len(self.pool))

    async def stop(self, grace: float | None = None) -> None:
        """Readiness goes NOT_SERVING at once; streams in flight get `grace` seconds to finish.

        The health server stays up until the ext_proc server has drained, so probes read
        NOT_SERVING (rather than a refused connection) while in-flight exchanges complete.
        """
        grace = self.options.grace_period if grace is None else grace
        await self.health.set_ready(False)
        main, health = self._servers
        await main.stop(grace)
        await health.stop(0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT; a background task that dies (e.g. discovery without
        credentials) stops the picker with its error rather than leaving it unready forever."""
        await self.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        signalled = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait([signalled, *self._services], return_when=asyncio.FIRST_COMPLETED)
        failed = next((t for t in done if t is not signalled), None)
        signalled.cancel()
        log.info("shutting down: draining streams for up to %.0fs", self.options.grace_period)
        await self.stop()
        if failed is not None:
            raise RuntimeError(f"{failed.get_name()} stopped") from failed.exception()
