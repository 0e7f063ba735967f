"""The serving stack of one mode, started from scratch and torn down after it.

Each mode gets freshly started replicas (cold KV caches), so no mode inherits another's cache:

- `direct`: the clients round-robin over the replicas themselves (Kubernetes ClusterIP, no proxy);
- `envoy-rr`: the real Envoy with its ROUND_ROBIN cluster (`envoy/envoy-rr.yaml`);
- `picker`: Envoy + picker with `envoy/envoy.yaml` (BUFFERED request, no per-token messages);
- `picker-gie`: Envoy called as GIE gateways call an EPP (`envoy/envoy-gie.yaml`: full duplex
  both ways), the picker in its default `close` mode (ends the stream with the request phase);
- `picker-gie-echo`: the same, the picker handing every response chunk back (`echo`);
- `picker-gie-lean`: `envoy/envoy-gie-lean.yaml` (full-duplex request, no response processing);
- `picker-x2`, `picker-x3`: like `picker`, with two or three active picker processes, all
  endpoints of Envoy's ext_proc cluster (round-robin over them, as a Deployment with N replicas
  behind a Service gets), each learning only from its own decisions;
- `picker-precise` (and `-x2`, `-x3`): the replicas publish KV events and the picker's
  `precise-prefix-cache-scorer` stands in for `prefix-cache-scorer` (`precise_config`), every
  picker following every replica's events;
- `oracle`: the clients route each request themselves with exact knowledge of every replica's
  cache and queue (`loadtest.oracle`): the upper bound routing can reach, no proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from loadtest.envoy import Envoy
from loadtest.processes import SimProcess, free_ports, start_picker
from picker.config import Config
from picker.scheduling.registry import effective_document
from vllm_sim import REPLICA_HEADER, get_profile
from vllm_sim.tokenizer import DEFAULT_CHAT_TEMPLATE, DEFAULT_TOKENIZER

DEFAULT_MODES = ("direct", "envoy-rr", "picker", "picker-gie", "picker-gie-echo", "picker-gie-lean")
# active pickers of a mode; others have one
PICKER_REPLICAS = {"picker-x2": 2, "picker-x3": 3, "picker-precise-x2": 2, "picker-precise-x3": 3}
PRECISE_MODES = ("picker-precise", "picker-precise-x2", "picker-precise-x3")
MODES = (*DEFAULT_MODES, "picker-x2", "picker-x3", *PRECISE_MODES, "oracle")
ENVOY_CONFIGS = {
    "envoy-rr": "rr",
    "picker": "picker",
    "picker-gie": "gie",
    "picker-gie-echo": "gie",
    "picker-gie-lean": "gie-lean",
    "picker-x2": "picker",
    "picker-x3": "picker",
    **dict.fromkeys(PRECISE_MODES, "picker"),
}
PICKER_MODES = frozenset(ENVOY_CONFIGS) - {"envoy-rr"}
PICKER_ARGS = {"picker-gie-echo": ("--response-processing=echo",)}  # on top of the run's own
READY_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The simulated replicas: how many, their profiles (cycled over them) and clock speed."""

    replicas: int = 4
    profiles: tuple[str, ...] = ("h100-8b",)
    speed: float = 1.0  # simulated time runs this many times faster than real time
    num_gpu_blocks: int | None = None  # override the profiles' KV capacity

    def __post_init__(self) -> None:
        for name in self.profiles:
            get_profile(name)  # KeyError naming the choices
        if self.replicas < 1 or self.speed <= 0:
            raise ValueError("need at least one replica and a positive speed")

    @property
    def replica_profiles(self) -> list[str]:
        return list(itertools.islice(itertools.cycle(self.profiles), self.replicas))

    @property
    def kv_tokens(self) -> int:
        """KV capacity of the smallest replica, in tokens."""
        profiles = [get_profile(name) for name in self.profiles]
        return min((self.num_gpu_blocks or p.num_gpu_blocks) * p.block_size for p in profiles)

    def sim_args(self) -> list[str]:
        args = ["--replicas", str(self.replicas), "--port", "0", "--speed", str(self.speed)]
        args += ["--profiles", ",".join(self.replica_profiles)]
        if self.num_gpu_blocks is not None:
            args += ["--num-gpu-blocks", str(self.num_gpu_blocks)]
        return args


@dataclass(frozen=True, slots=True)
class Stack:
    mode: str
    replicas: list[str]  # ip:port of every replica, in pool order
    names: dict[str, str]  # x-sim-replica header value -> ip:port
    profiles: dict[str, str]  # ip:port -> simulator profile
    targets: list[str]  # base URLs the clients send to
    model: str
    processes: dict[str, int]  # role -> pid, for CPU accounting (picker, picker-2, ...)
    envoy: Envoy | None = None  # the gateway of the modes that have one (its stats)


@contextlib.asynccontextmanager
async def start_stack(
    mode: str, pool: PoolSpec, logs: Path, picker_args: Sequence[str] = ()
) -> AsyncIterator[Stack]:
    """Start the replicas, then the picker and Envoy the mode needs; stop them all on exit."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    sim_args = pool.sim_args()
    kv_events = free_ports(2 * pool.replicas) if mode in PRECISE_MODES else 0  # publishers, replays
    replay = kv_events + pool.replicas
    if kv_events:
        sim_args += ["--kv-events-port", str(kv_events), "--kv-events-replay-port", str(replay)]
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimProcess(*sim_args, ready_timeout=READY_TIMEOUT))
        assert sim.pid is not None
        replicas, processes = list(sim.addresses), {"simulator": sim.pid}
        model, names = await _identify(replicas)
        if kv_events:
            publishers = {address: f"tcp://127.0.0.1:{kv_events + i}" for i, address in enumerate(replicas)}
            replays = {address: f"tcp://127.0.0.1:{replay + i}" for i, address in enumerate(replicas)}
            config = logs / "picker-precise.yaml"
            config.write_bytes(orjson.dumps(precise_config(publishers, replays)))  # JSON is YAML
            picker_args = (f"--config-file={config}", *picker_args)
        targets = [f"http://{address}" for address in replicas]
        envoy = None
        if mode in ENVOY_CONFIGS:
            pickers = []
            if mode in PICKER_MODES:
                args = (*PICKER_ARGS.get(mode, ()), *picker_args)
                for n in range(1, PICKER_REPLICAS.get(mode, 1) + 1):
                    role = "picker" if n == 1 else f"picker-{n}"
                    started = start_picker(replicas, logs / f"{role}.log", args)
                    picker = await stack.enter_async_context(started)
                    processes[role] = picker.pid
                    pickers.append(picker.address)
            envoy = await stack.enter_async_context(
                Envoy.start(ENVOY_CONFIGS[mode], endpoints=replicas, picker=pickers, workdir=logs / "envoy")
            )
            processes["envoy"] = envoy.pid
            targets = [envoy.url]
        profiles = dict(zip(sim.addresses, sim.profiles, strict=True))
        yield Stack(mode, replicas, names, profiles, targets, model, processes, envoy)


def precise_config(publishers: dict[str, str], replays: dict[str, str] | None = None) -> dict[str, Any]:
    """picker's default configuration with `precise-prefix-cache-scorer` in place of
    `prefix-cache-scorer` (same weight), reading the simulator's tokenizer and chat template and
    the replicas' KV events (`publishers`) and replay sockets (`replays`) by address."""
    doc = effective_document(Config())
    for plugin in doc["plugins"]:
        if plugin["type"] == "prefix-cache-scorer":
            plugin["type"] = "precise-prefix-cache-scorer"
            plugin["parameters"] = {
                "tokenizer": str(DEFAULT_TOKENIZER),
                "chatTemplate": str(DEFAULT_CHAT_TEMPLATE),
                "hashAlgorithm": "xxh3_64",  # the simulator's block hashes
                "kvEventsEndpoints": publishers,
                **({"kvEventsReplayEndpoints": replays} if replays else {}),
            }
    for profile in doc["schedulingProfiles"]:
        for ref in profile["plugins"]:
            if ref["pluginRef"] == "prefix-cache-scorer":
                ref["pluginRef"] = "precise-prefix-cache-scorer"
    return doc


async def _identify(replicas: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The served model, and which address answers under which `x-sim-replica` name."""
    names: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=5.0) as http:
        for address in replicas:
            response = await http.get(f"http://{address}/v1/models")
            response.raise_for_status()
            names[response.headers.get(REPLICA_HEADER, address)] = address
            model: str = response.json()["data"][0]["id"]
    return model, names
