"""`picker serve`: the reference EPP's flags, so the picker drops into existing deployments."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

from picker.config import RESPONSE_PROCESSING, Config
from picker.discovery.source import EndpointSource
from picker.discovery.static import StaticSource, parse_endpoints


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ports must be integers: {text!r}") from None
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"ports must be in 1..65535: {text!r}")
    return ports


def _selector(text: str) -> dict[str, str]:
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"selector entries are key=value: {item!r}")
        pairs[key] = value
    return pairs


def _default_bind_address() -> str:
    # Inside a cluster the gateway reaches the picker over the Pod IP; on a laptop, loopback only.
    return "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST") else "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="picker", description="KV-cache-aware endpoint picker for vLLM (EPP over ext_proc)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the ext_proc server",
        description="Run the EPP ext_proc server. Endpoints come from --endpoints (static), "
        "--pool-name (an InferencePool) or --endpoint-selector (Pods by label).",
    )
    serve.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (9002)")
    serve.add_argument(
        "--grpc-health-port",
        type=int,
        default=9003,
        help="gRPC health port: services liveness, readiness, ext_proc (9003)",
    )
    serve.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (9090)")
    serve.add_argument(
        "--bind-address",
        default=_default_bind_address(),
        help="address all ports listen on (127.0.0.1; 0.0.0.0 inside Kubernetes)",
    )
    serve.add_argument(
        "--secure-serving",
        type=_bool,
        default=True,
        metavar="BOOL",
        help="serve ext_proc over TLS (true); without --cert-path a self-signed certificate "
        "is made at start-up; --secure-serving=false for plaintext",
    )
    serve.add_argument(
        "--cert-path", help="directory with tls.crt and tls.key to serve instead of a self-signed one"
    )
    _config_arguments(serve)
    serve.add_argument(
        "--response-processing",
        choices=RESPONSE_PROCESSING,
        help="full-duplex gateways: end the ext_proc stream with the request phase (close, the "
        "default) or hand every response chunk back (echo); overrides the config file",
    )
    serve.add_argument(
        "--conformance-hooks",
        action="store_true",
        help="honour the GIE conformance suite's test-epp-endpoint-selection request header and "
        "report x-conformance-test-served-endpoint, keeping ext_proc streams open for it (off: a "
        "client must not choose its replica)",
    )
    serve.add_argument("--endpoints", help="static pool: comma-separated ip:port list of vLLM replicas")
    serve.add_argument("--pool-name", help="InferencePool to watch for endpoints")
    serve.add_argument(
        "--pool-namespace",
        default=os.environ.get("NAMESPACE", "default"),
        help="namespace of the InferencePool / Pods ($NAMESPACE, else default)",
    )
    serve.add_argument(
        "--endpoint-selector",
        type=_selector,
        help="Pods by label (k=v,...) when there is no InferencePool; needs --endpoint-target-ports",
    )
    serve.add_argument(
        "--endpoint-target-ports",
        type=_ports,
        help="ports of the selected Pods that serve inference (8000[,8001])",
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        default=25.0,
        help="seconds in-flight streams get to finish after SIGTERM (25)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-prompts",
        action="store_true",
        help="include prompt text in debug logs (off: logs never carry prompts)",
    )
    show = commands.add_parser(
        "config",
        help="print the effective configuration",
        description="Print the configuration picker would run, as a complete EndpointPickerConfig: "
        "every plugin with all its parameters (the defaults without --config-file/--config-text).",
    )
    _config_arguments(show)
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--config-file",
        help="an EndpointPickerConfig (GIE or llm-d) with picker's own sections; see "
        "gateway/base/config.yaml for every setting",
    )
    given.add_argument("--config-text", help="the same document inline")


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    try:
        return Config.load(args.config_file, args.config_text)
    except (OSError, ValueError) as exc:
        parser.error(f"{'--config-file' if args.config_file else '--config-text'}: {exc}")


def _print_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import yaml

    from picker.scheduling.registry import effective_document, resolve

    config = _config(args, parser)
    try:
        resolve(config.scheduling, conformance_hooks=True)
        document = effective_document(config)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(yaml.safe_dump(document, sort_keys=False))
    return 0


def _source(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EndpointSource:
    chosen = [bool(args.endpoints), bool(args.pool_name), bool(args.endpoint_selector)]
    if sum(chosen) != 1:
        parser.error("give exactly one of --endpoints, --pool-name or --endpoint-selector")
    if args.endpoints:
        try:
            return StaticSource(parse_endpoints(args.endpoints))
        except ValueError as exc:
            parser.error(str(exc))
    if args.endpoint_selector and not args.endpoint_target_ports:
        parser.error("--endpoint-selector needs --endpoint-target-ports")
    from picker.discovery.kubernetes import kubernetes_source

    return kubernetes_source(
        pool_name=args.pool_name,
        namespace=args.pool_namespace,
        selector=args.endpoint_selector,
        target_ports=args.endpoint_target_ports,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "config":
        return _print_config(args, parser)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    source = _source(args, parser)
    config = _config(args, parser)
    if args.response_processing is not None:
        config = dataclasses.replace(config, response_processing=args.response_processing)
    from picker.server import PickerServer, ServeOptions

    try:
        server = PickerServer(
            ServeOptions(
                source=source,
                config=config,
                bind_address=args.bind_address,
                grpc_port=args.grpc_port,
                grpc_health_port=args.grpc_health_port,
                metrics_port=args.metrics_port,
                secure_serving=args.secure_serving,
                cert_path=args.cert_path,
                grace_period=args.grace_period,
                log_prompts=args.log_prompts,
                conformance_hooks=args.conformance_hooks,
                pool_name=args.pool_name or "",
            )
        )
    except ValueError as exc:  # plugins, parameters or profile the config names
        parser.error(f"configuration: {exc}")
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(server.run_until_signalled())
    except RuntimeError as exc:
        logging.getLogger("picker").critical("%s: %s", exc, exc.__cause__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
